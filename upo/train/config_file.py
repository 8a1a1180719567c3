"""``--config FILE``: settings from YAML or JSON, read through the flags' own argparse actions.

Each value goes through the ``type`` and ``choices`` of its flag, so ``lr: 5e-4`` (a string to
PyYAML) is a float, ``batch_size: four`` fails with the message ``--batch-size four`` gives, and
on/off flags take YAML booleans (``true/false, yes/no, on/off``, quoted or not). Keys are our
settings (``-`` or ``_``) or the names of TRL's ``DPOConfig`` and its script/model arguments
(:data:`TRL_ALIASES`). Errors name the file, the line and the key.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
from pathlib import Path
from typing import Any

from upo.train.errors import UserError

# TRL names -> our settings. Same-named settings need no alias: beta, loss_type, loss_weights,
# label_smoothing, max_length, max_prompt_length, max_completion_length, max_steps, warmup_steps,
# weight_decay, max_grad_norm, seed, output_dir, gradient_checkpointing, lora_r, lora_alpha.
TRL_ALIASES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",  # times the number of processes: ours is global
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "precompute_ref_log_probs": "precompute_ref",
    "padding_free": "packing",
    "truncation_mode": "truncation",
    "lr_scheduler_type": "lr_scheduler",
    "optim": "optimizer",
    "bf16": "precision",  # true -> bf16, false -> fp32
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "save_total_limit": "keep_checkpoints",
    "disable_tqdm": "progress",  # negated
    "resume_from_checkpoint": "resume",
    "model_name_or_path": "model",
    "dtype": "model_dtype",  # TRL's ModelConfig: bfloat16, float16, float32
    "use_peft": "lora",
    "dataset_name": "dataset",
    "dataset_train_split": "dataset_split",
    "dataset_test_split": "eval_split",
}
# TRL's spellings of values we name differently.
TRL_VALUES = {
    "optimizer": {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw"},
    "lr_scheduler": {"constant_with_warmup": "constant"},
    "model_dtype": {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"},
}
YAML_TRUE = ("true", "yes", "on", "y")
YAML_FALSE = ("false", "no", "off", "n")


def alias_help() -> str:
    """The alias table, for ``--help``."""
    return ", ".join(f"{trl}={ours}" for trl, ours in TRL_ALIASES.items())


def load_config_file(path: str, parser: argparse.ArgumentParser) -> tuple[dict, dict[str, str]]:
    """``(settings, sources)``: parsed values by setting, and ``"FILE line N (key)"`` by setting."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--config: file not found: {path}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--config {path}: cannot read it as UTF-8 text ({err})") from None
    data = _parse(text, file)
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must hold a mapping of settings, got {type(data).__name__}")
    lines = _key_lines(text, path)
    reader = _SettingReader(parser)
    settings: dict[str, Any] = {}
    sources: dict[str, str] = {}
    keys: dict[str, str] = {}
    for key, value in data.items():
        where = f"{path} line {lines[key]}" if key in lines else str(path)
        dest, parsed = reader.read(str(key), value, f"{where}: {key}")
        if dest is None:  # null: keep the default
            continue
        if dest in settings:
            raise UserError(f"{where}: {key} sets {dest}, which {keys[dest]} already sets")
        settings[dest], sources[dest], keys[dest] = parsed, f"{where} ({key})", key
    return settings, sources


def _parse(text: str, file: Path):
    try:
        if file.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as err:  # parse errors are user errors
        raise UserError(f"--config {file}: cannot parse it: {' '.join(str(err).split())}") from None


def _key_lines(text: str, path: str) -> dict[str, int]:
    """Line of each top-level key (YAML reads JSON too); a key given twice is an error."""
    import yaml

    try:
        node = yaml.compose(text)
    except Exception:  # JSON that PyYAML does not read: no line numbers
        return {}
    lines: dict[str, int] = {}
    for key_node, _ in getattr(node, "value", []) if isinstance(node, yaml.MappingNode) else []:
        line = key_node.start_mark.line + 1
        if key_node.value in lines:
            raise UserError(f"{path} line {line}: {key_node.value} is given twice (also line {lines[key_node.value]})")
        lines[key_node.value] = line
    return lines


class _SettingReader:
    """Turns one ``key: value`` of the file into ``(setting, value)`` through the flag's argparse action."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser
        self.by_option: dict[str, argparse.Action] = {}
        self.by_dest: dict[str, argparse.Action] = {}
        for action in parser._actions:  # the parser's own table of flags
            if action.dest in ("help", "config"):
                continue
            self.by_dest.setdefault(action.dest, action)
            for option in action.option_strings:
                self.by_option[option.lstrip("-").replace("-", "_")] = action

    def read(self, key: str, value: Any, where: str) -> tuple[str | None, Any]:
        name = key.strip().replace("-", "_")
        if name == "config":
            raise UserError(f"{where}: a config file cannot name another config file")
        if name in TRL_ALIASES:
            return self._read_alias(name, value, where)
        action = self.by_option.get(name)
        as_flag = action is not None  # `no_progress: true` is the flag; `progress: false` the setting
        action = action or self.by_dest.get(name)
        if action is None:
            known = sorted(set(self.by_option) | set(TRL_ALIASES))
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else " (see upo-train --help)"
            raise UserError(f"{where}: unknown setting{hint}")
        if value is None:
            return None, None
        if action.nargs == 0:  # an on/off flag
            on = yaml_bool(value, where)
            return action.dest, (action.const if on else not action.const) if as_flag else on
        return action.dest, self._values(action, value, where)

    def _read_alias(self, name: str, value: Any, where: str) -> tuple[str | None, Any]:
        dest = TRL_ALIASES[name]
        if value is None:
            return None, None
        if name == "bf16":
            return dest, "bf16" if yaml_bool(value, where) else "fp32"
        if name == "disable_tqdm":
            return dest, not yaml_bool(value, where)
        if isinstance(value, str):
            value = TRL_VALUES.get(dest, {}).get(value, value)
        _, parsed = self.read(dest, value, where)
        if name == "per_device_train_batch_size":
            parsed *= int(os.environ.get("WORLD_SIZE", "1"))
        return dest, parsed

    def _values(self, action: argparse.Action, value: Any, where: str) -> Any:
        many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not many:
            raise UserError(f"{where}: {action.option_strings[0]} takes one value, got a list")
        if many and not items:
            raise UserError(f"{where}: {action.option_strings[0]} needs at least one value")
        parsed = []
        for item in items:
            # `--flag=value`: one token per value, so a value that starts with '-' is never read as a flag.
            try:
                namespace = self.parser.parse_args([f"{action.option_strings[0]}={_token(item, action, where)}"])
            except UserError as err:
                raise UserError(f"{where}: {err}") from None
            result = getattr(namespace, action.dest)
            parsed.extend(result if many else [result])
        return parsed if many else parsed[0]


def yaml_bool(value: Any, where: str) -> bool:
    """A YAML boolean, quoted or not (``"false"`` is false)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in YAML_TRUE + YAML_FALSE:
        return value.strip().lower() in YAML_TRUE
    raise UserError(f"{where}: expected true or false (also yes/no, on/off), got {value!r}")


def _token(item: Any, action: argparse.Action, where: str) -> str:
    """The command-line spelling of one file value."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, (int, float, str)):
        return str(item)
    if isinstance(item, dict) and action.dest == "model_config":
        return json.dumps(item)
    raise UserError(f"{where}: expected a value for {action.option_strings[0]}, got {type(item).__name__}")
