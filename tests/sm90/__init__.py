"""The sm_90 compile gate's case table (`cases.py`) and offline compiler (`compile.py`)."""
