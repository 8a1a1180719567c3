"""Rows of a preference dataset: a local JSONL/JSON/Parquet file, a saved or hub ``datasets`` dataset.

Every row keeps where it came from (``data.jsonl line 21``, ``org/name [train] row 5``), so a
bad row is reported at its true place in the user's file.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants as hf_constants

from upo.rewards import RESOURCES_DIR
from upo.train.errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class Records(list):
    """A list of row dicts with ``locations[i]``: ``(source, unit, number)``, e.g. ``("d.jsonl", "line", 21)``."""

    def __init__(self, rows=(), locations=None, source: str = "", unit: str = "row"):
        super().__init__(rows)
        self.locations = list(locations) if locations is not None else [(source, unit, i) for i in range(len(self))]

    def head(self, n: int | None) -> "Records":
        return self if n is None else Records(self[:n], self.locations[:n])

    def __add__(self, other: "Records") -> "Records":
        return Records(list(self) + list(other), self.locations + locations_of(other))


def locations_of(records: list) -> list[tuple[str, str, int]]:
    """Where each row came from (plain lists: ``row i``)."""
    return getattr(records, "locations", None) or [("", "row", i) for i in range(len(records))]


def describe_location(location: tuple[str, str, int]) -> str:
    source, unit, number = location
    return f"{source} {unit} {number}".strip()


def describe_locations(locations: list[tuple[str, str, int]], limit: int = 32) -> str:
    """``d.jsonl lines 4, 6, 9`` (several sources: one group each; long lists end with ``+N more``)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for source, unit, number in locations[:limit]:
        groups.setdefault((source, unit), []).append(number)
    text = "; ".join(f"{source} {unit}{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}".strip()
                     for (source, unit), numbers in groups.items())
    return text + (f" (+{len(locations) - limit} more)" if len(locations) > limit else "")


def default_dataset_path(conversational: bool = False) -> Path:
    """The preference data shipped with the package (readable = chosen, convoluted = rejected): plain strings,
    or the same rows as chat messages (for a model with a chat template)."""
    return RESOURCES_DIR / ("preferences_conversational.jsonl" if conversational else "preferences.jsonl")


def load_records(source: str | None, split: str = "train", conversational_default: bool = False) -> Records:
    """Rows of a local JSONL/JSON/Parquet file, or of a Hugging Face dataset (``datasets``, lazily).

    ``None`` loads :func:`default_dataset_path` (``conversational_default``: its conversational form). A
    name that is not an existing file is treated as a hub dataset only if it looks like one (``owner/name``,
    no file suffix).
    """
    path = Path(source).expanduser() if source else default_dataset_path(conversational_default)
    if path.is_file():
        return _load_local_file(path)
    if path.is_dir():
        return _load_hf_dataset(str(path), split)
    if source and _looks_like_hub_id(source):
        _check_hub_reachable(source)
        return _load_hf_dataset(source, split)
    raise UserError(f"dataset not found: {source or path}")


def load_split_if_present(source: str | None, split: str) -> Records | None:
    """The ``split`` of a Hugging Face dataset (saved folder, data-file folder, hub id), or None when the
    source has no splits (a local file) or not that one."""
    if not source or Path(source).expanduser().is_file():
        return None
    path = Path(source).expanduser()
    if not (path.is_dir() or _looks_like_hub_id(source)):
        return None
    if not path.is_dir():
        _check_hub_reachable(source)
    if split not in _split_names(str(path) if path.is_dir() else source):
        return None
    return _load_hf_dataset(str(path) if path.is_dir() else source, split)


def _looks_like_hub_id(name: str) -> bool:
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and not name.lower().endswith(LOCAL_SUFFIXES))


def _check_hub_reachable(name: str) -> None:
    """Refuse at once a hub id that cannot be loaded: the Hub cannot be asked (offline mode, or no network) and
    the dataset is not in the local cache. Without this, ``datasets`` retries for about 30 s before failing."""
    datasets = _import_datasets(name)
    if datasets.config.HF_HUB_OFFLINE:
        why = "offline mode is on (HF_HUB_OFFLINE)"
    else:
        host = urlparse(hf_constants.ENDPOINT).hostname or hf_constants.ENDPOINT
        try:
            socket.getaddrinfo(host, 443)  # no request: only whether the Hub's host resolves
            return
        except OSError:
            why = f"the Hub ({host}) cannot be reached (no network)"
    owner, _, repo = name.partition("/")
    cached = [Path(hf_constants.HF_HUB_CACHE) / f"datasets--{owner}--{repo}",
              Path(datasets.config.HF_DATASETS_CACHE) / f"{owner}___{repo}"]
    if not any(folder.is_dir() for folder in cached):
        raise UserError(f"dataset '{name}' is neither a local file or folder nor in the Hugging Face cache, and "
                        f"{why}: give a local .jsonl/.json/.parquet file or folder, or download it first")


def _load_local_file(path: Path) -> Records:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(path)
    if suffix == ".json":
        return _load_json(path)
    if suffix == ".parquet":
        return _load_parquet(path)
    raise UserError(f"{path}: unsupported dataset file type '{suffix}' (use .jsonl, .json or .parquet)")


def _load_jsonl(path: Path) -> Records:
    rows, locations = [], []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path} line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                f"{err.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {number}: expected a JSON object with prompt/chosen/rejected, "
                                f"got {type(row).__name__}")
            rows.append(row)
            locations.append((str(path), "line", number))
    return Records(rows, locations)


def _load_json(path: Path) -> Records:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte offset {err.start}); save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
        data = data.get("train", data.get("data", data))
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{path} record {i}: expected a JSON object with prompt/chosen/rejected, "
                            f"got {type(row).__name__}")
    return Records(data, source=str(path), unit="record")


def _load_parquet(path: Path) -> Records:
    import pyarrow.parquet as pq  # lazily: only Parquet users need it

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow's ArrowInvalid / OSError: an empty, truncated or foreign file
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path}: not a readable Parquet file ({first_line})") from None
    return Records(rows, source=str(path), unit="row")


def _split_names(name: str) -> list[str]:
    """The dataset's splits; none when they cannot be listed (offline, say): loading the training split
    then reports what is wrong, or works from the cache."""
    datasets = _import_datasets(name)
    folder = Path(name)
    try:
        if (folder / "dataset_dict.json").is_file():
            return list(datasets.load_from_disk(name))
        if (folder / "state.json").is_file():
            return []  # one saved Dataset: no splits
        return list(datasets.get_dataset_split_names(name))
    except Exception:
        return []


def _import_datasets(name: str):
    try:
        import datasets  # lazily: heavy import, optional dependency
    except ImportError:
        raise UserError(f"loading '{name}' needs the 'datasets' package (pip install datasets)") from None
    return datasets


def _load_hf_dataset(name: str, split: str) -> Records:
    """A hub dataset, a local folder of data files, or a folder written by ``save_to_disk``."""
    datasets = _import_datasets(name)
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
    except Exception as err:  # network, missing split, bad name, unreadable data files: all user-facing
        if Path(name).is_dir():
            # datasets' own message for a data file it cannot parse is only "An error occurred while generating
            # the dataset"; the parser's is its cause
            generic = isinstance(err, datasets.exceptions.DatasetGenerationError) and err.__cause__ is not None
            raise _folder_error(Path(name), split, err.__cause__ if generic else err) from None
        raise UserError(f"could not load dataset '{name}' (split {split}): {_first_line(err)}") from None
    return Records(data.to_list(), source=f"{name} [{split}]", unit="row")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _folder_error(folder: Path, split: str, err: BaseException) -> UserError:
    """What is wrong with a folder of data files ``datasets`` could not read (``err``): the first of its
    .jsonl/.json/.parquet files that our own readers refuse, naming the file and line, else ``err``."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES):
        try:
            _load_local_file(path)
        except UserError as bad:
            return UserError(f"dataset folder {folder}: {bad}")
    return UserError(f"dataset folder {folder} (split {split}): datasets could not read it ({_first_line(err)}); "
                     "expected a folder written by save_to_disk, or data files (.jsonl, .json, .parquet) of "
                     "prompt/chosen/rejected or prompt/completion/label rows")
