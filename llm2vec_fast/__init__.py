"""llm2vec-fast: Triton kernels that make LLM2Vec encoders fast to train and to run.

``llm2vec_fast.patch(model)`` makes a Hugging Face decoder bidirectional through our attention kernel;
``llm2vec_fast.LLM2Vec`` is the encoder; ``llm2vec_fast.kernels`` holds the fused ops.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_MINIMUM_VERSIONS = {"torch": "2.5", "triton": "3.2", "transformers": "5.0"}


def _check_versions() -> None:
    from importlib.metadata import PackageNotFoundError, version

    def as_tuple(text: str) -> tuple[int, ...]:
        parts = []
        for piece in text.split("+")[0].split(".")[:3]:
            digits = "".join(ch for ch in piece if ch.isdigit())
            parts.append(int(digits or 0))
        return tuple(parts)

    for package, minimum in _MINIMUM_VERSIONS.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            if package == "triton":  # optional on CPU-only machines: the PyTorch references run instead
                continue
            raise ImportError(f"llm2vec-fast needs {package}>={minimum}, which is not installed") from None
        if as_tuple(installed) < as_tuple(minimum):
            raise ImportError(f"llm2vec-fast needs {package}>={minimum}, found {installed}")


_check_versions()

# Imported eagerly: once the submodule ``llm2vec_fast.patch`` is imported (by anyone), Python binds the package
# attribute ``patch`` to that module, so a lazy ``__getattr__`` would then hand out the module, not the function.
from .patch import patch, unpatch  # noqa: E402

_LAZY = {
    "LLM2Vec": "llm2vec_fast.encoder",
}

__all__ = ["patch", "unpatch", "LLM2Vec", "__version__"]


def __getattr__(name: str):
    # Imported on first use so that `import llm2vec_fast.kernels` stays light.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llm2vec_fast' has no attribute {name!r}")
