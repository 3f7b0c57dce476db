"""tests/sm90/codegen_digest.py, the before/after fingerprint of the sm_90 code: its comparison and case choice
(the compiles themselves need minutes; docs/PERF.md records a run)."""

from __future__ import annotations

import pytest

from sm90.codegen_digest import REPRESENTATIVE, REPRESENTATIVE_CAUSAL, _cases, compare


def _digest(**changes):
    return {"sass_sha256": "a", "ptx_sha256": "b", "instructions": 10, "registers": 128, "spill_bytes": 0,
            "shared": 0, **changes}


def test_compare_counts_identical_different_and_missing_cases(capsys):
    before = {"same": _digest(), "regs": _digest(), "gone": _digest(), "failed": _digest()}
    after = {"same": _digest(), "regs": _digest(registers=130), "new": _digest(), "failed": {"error": "boom"}}
    assert compare(before, after) == 1
    out = capsys.readouterr().out
    assert "regs: registers 128 -> 130" in out
    assert "gone: missing or failed (absent)" in out and "new: missing or failed (absent)" in out
    assert "failed: missing or failed (boom)" in out
    assert out.strip().endswith("5 cases, 1 identical SASS and PTX, 4 different")
    assert compare({"same": _digest()}, {"same": _digest()}) == 0


def test_the_representative_set_names_existing_cases_and_a_misspelt_name_is_refused():
    cases = _cases(list(REPRESENTATIVE), list(REPRESENTATIVE_CAUSAL))
    assert len([c for c in cases if c["name"].endswith("-causal")]) >= len(REPRESENTATIVE_CAUSAL)
    assert all(any(part in c["name"] for c in cases) for part in REPRESENTATIVE)
    with pytest.raises(ValueError, match="no_such_kernel"):
        _cases(["no_such_kernel"], [])
