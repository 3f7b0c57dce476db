"""llm2vec-fast: Triton kernels that make LLM2Vec encoders fast to train and to run.

``llm2vec_fast.patch(model)`` makes a Hugging Face decoder bidirectional through our attention kernel;
``llm2vec_fast.LLM2Vec`` is the encoder; ``llm2vec_fast.kernels`` holds the fused ops.

The public names are imported on first use, so that ``import llm2vec_fast`` (and ``llm2vec-fast --help``)
does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_MINIMUM_VERSIONS = {"torch": "2.5", "triton": "3.2", "transformers": "5.5"}


def _older_than(installed: str, minimum: str) -> bool:
    from packaging.version import Version

    # A pre-release of the minimum (3.2.0rc1) is older than the minimum; a local tag (2.13.0+cpu) counts as its
    # release.
    return Version(installed) < Version(minimum)


def _check_versions() -> None:
    from importlib.metadata import PackageNotFoundError, version

    for package, minimum in _MINIMUM_VERSIONS.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            raise ImportError(f"llm2vec-fast needs {package}>={minimum}, which is not installed") from None
        if _older_than(installed, minimum):
            raise ImportError(f"llm2vec-fast needs {package}>={minimum}, found {installed}")


_check_versions()

_LAZY = {**dict.fromkeys(("patch", "unpatch", "unpatched", "is_patched"), "llm2vec_fast.bidirectional"),
         "LLM2Vec": "llm2vec_fast.encoder"}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llm2vec_fast' has no attribute {name!r}")
