"""The package's import surface: light imports, the public names, the version check."""

from __future__ import annotations

import subprocess
import sys

import pytest

NO_TORCH = "import sys; {}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_the_package_does_not_import_torch():
    result = _run(NO_TORCH.format("import llm2vec_fast; llm2vec_fast.__version__"))
    assert result.returncode == 0, result.stderr


def test_cli_help_does_not_import_torch():
    code = NO_TORCH.format(
        "import runpy; sys.argv = ['llm2vec-fast', '--help']\n"
        "try:\n    runpy.run_module('llm2vec_fast.cli', run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert e.code == 0, e.code"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "llm2vec-fast" in result.stdout  # the help was printed, so the check ran after argparse


def test_public_names_are_the_functions_whatever_was_imported_before():
    import llm2vec_fast
    import llm2vec_fast.attention_adapter  # noqa: F401  (submodules imported first must not shadow the functions)
    import llm2vec_fast.bidirectional as bidirectional

    assert llm2vec_fast.patch is bidirectional.patch and callable(llm2vec_fast.patch)
    assert llm2vec_fast.unpatch is bidirectional.unpatch
    assert llm2vec_fast.is_patched is bidirectional.is_patched
    assert llm2vec_fast.unpatched is bidirectional.unpatched
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        llm2vec_fast.nothing  # noqa: B018


@pytest.mark.parametrize(("installed", "minimum", "older"), [
    ("3.2.0rc1", "3.2", True),  # a pre-release of the minimum is older than it (digit-scraping read it as 3.2.1)
    ("3.1.9", "3.2", True),
    ("3.2.0", "3.2", False),
    ("2.13.0+cpu", "2.5", False),  # local build tags count as their release
    ("5.0.0.dev0", "5.0", True),
    ("10.0", "5.0", False),
])
def test_version_check_reads_versions_as_packaging_does(installed, minimum, older):
    from llm2vec_fast import _older_than

    assert _older_than(installed, minimum) is older


def test_dtype_names_live_in_dtypes_and_old_imports_keep_working():
    import torch

    from llm2vec_fast import dtypes
    from llm2vec_fast.training import modeling

    assert modeling.resolve_dtype is dtypes.resolve_dtype and modeling.MODEL_DTYPES is dtypes.MODEL_DTYPES
    assert dtypes.resolve_dtype("bf16") is torch.bfloat16 and dtypes.resolve_dtype("float32") is torch.float32
    assert dtypes.resolve_dtype("auto") is dtypes.default_dtype()
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        dtypes.resolve_dtype("half")
