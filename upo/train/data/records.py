"""Rows of a preference dataset: a local JSONL/JSON/Parquet file, a saved or hub ``datasets`` dataset."""
from __future__ import annotations

import json
from pathlib import Path

from upo.rewards import RESOURCES_DIR
from upo.train.errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def default_dataset_path() -> Path:
    """The preference data shipped with the package (readable = chosen, convoluted = rejected)."""
    return RESOURCES_DIR / "preferences.jsonl"


def load_records(source: str | None, split: str = "train") -> list[dict]:
    """Rows of a local JSONL/JSON/Parquet file, or of a Hugging Face dataset (``datasets``, lazily).

    ``None`` loads :func:`default_dataset_path`. A name that is not an existing file is treated
    as a hub dataset only if it looks like one (``owner/name``, no file suffix).
    """
    path = Path(source).expanduser() if source else default_dataset_path()
    if path.is_file():
        return _load_local_file(path)
    if path.is_dir():
        return _load_hf_dataset(str(path), split)
    if source and _looks_like_hub_id(source):
        return _load_hf_dataset(source, split)
    raise UserError(f"dataset not found: {source or path}")


def _looks_like_hub_id(name: str) -> bool:
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and not name.lower().endswith(LOCAL_SUFFIXES))


def _load_local_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
                data = data.get("train", data.get("data", data))
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON list of records")
            return data
        if suffix == ".parquet":
            import pyarrow.parquet as pq  # lazily: only Parquet users need it

            return pq.read_table(path).to_pylist()
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    raise UserError(f"{path}: unsupported dataset file type '{suffix}' (use .jsonl, .json or .parquet)")


def _load_hf_dataset(name: str, split: str) -> list[dict]:
    """A hub dataset, a local folder of data files, or a folder written by ``save_to_disk``."""
    try:
        import datasets  # lazily: heavy import, optional dependency
    except ImportError:
        raise UserError(f"loading '{name}' needs the 'datasets' package (pip install datasets)") from None
    try:
        folder = Path(name)
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            data = datasets.load_from_disk(name)
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise UserError(f"dataset '{name}' has no split '{split}' (splits: {', '.join(data)})")
                data = data[split]
        else:
            data = datasets.load_dataset(name, split=split)
    except UserError:
        raise
    except Exception as err:  # network, missing split, bad name: all user-facing
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load dataset '{name}' (split {split}): {first_line}") from None
    return data.to_list()
