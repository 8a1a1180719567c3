"""Small pieces the benchmark scripts share: where results go, atomic JSON writes, knob strings.

Results go to ``--out`` if given, else ``$OUT`` (the device tool's folder), else
``./bench-results/`` under the current directory (git-ignored through ``/bench-results/``), never
into the source tree unless asked (``--out benchmarks/results/<device>-<date>`` to commit raw
output).
"""
from __future__ import annotations

import json
import os

DEFAULT_OUT = "bench-results"


def default_out_dir() -> str:
    """``./bench-results`` under the current directory (absolute)."""
    return os.path.join(os.getcwd(), DEFAULT_OUT)


def out_dir(explicit=None, create=True) -> str:
    """``explicit`` (``--out``), else ``$OUT``, else ``default_out_dir()``; absolute, created."""
    path = os.path.abspath(explicit or os.environ.get("OUT") or default_out_dir())
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def write_json(doc, path):
    """Write ``doc`` to ``path`` through a temporary file, so a kill never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def parse_env(text) -> dict:
    """``"UPO_FWD_IMPL=cublas UPO_LOGITS=input"`` (spaces or commas) -> dict; empty -> {}."""
    out = {}
    for item in (text or "").replace(",", " ").split():
        if "=" not in item:
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        if not k.startswith("UPO_"):
            raise ValueError(f"only UPO_* knobs can be set this way, got {k!r}")
        out[k] = v
    return out


def format_env(env) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted((env or {}).items()))
