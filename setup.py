from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).parent / "README.md"

setup(
    name="llm2vec-fast",
    version="0.1.0",
    description="Triton kernels and training recipes that make LLM2Vec encoders fast",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llm2vec_fast", "llm2vec_fast.*"]),
    package_data={"llm2vec_fast": ["resources/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        # The CPU build of torch 2.13 is what the README installs on machines without a GPU;
        # a GPU user installs the CUDA build of any torch >= 2.5 first.
        "torch>=2.5",
        "triton>=3.2",
        # 5.5 is the oldest release the support matrix passes on (.ci/run tests it beside the newest): 5.0-5.1
        # ignore config.is_causal, 5.2-5.3 hand mask builders cache_position, 5.4 cannot build an OLMo-2 config.
        "transformers>=5.5,<6",
        "peft>=0.13",
        "datasets>=3.0",
        "tqdm",
        "safetensors",
        "numpy",
        "packaging",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-xdist",  # the fast loop: python -m pytest tests/ -m "not slow" -n 2
            "gguf>=0.10",
            "sentencepiece",
            # tests/test_export.py and the encode benchmark load exported models through it (its 6.x module API);
            # mteb pulls some version in too, but not necessarily one of 6.x.
            "sentence-transformers>=6",
            # tests/test_ray.py runs map_batches on a local Ray (a 80 MB wheel, installed in ~40 s).
            "ray[data]",
        ],
        "eval": ["mteb>=2.0,<3", "matplotlib"],
        "parquet": ["pyarrow"],
        "ray": ["ray[data]"],  # llm2vec_fast.ray.EmbedBatch for ray.data's map_batches
        "sentence-transformers": ["sentence-transformers>=6"],
    },
    entry_points={"console_scripts": ["llm2vec-fast=llm2vec_fast.cli:main"]},
)
