"""One run per ``--output-dir``: claim the folder (lock, checks) before the run writes anything.

A fresh start into a folder that holds another run's files is refused unless ``--overwrite``
(which removes them); ``--resume`` continues the run the folder holds. Nothing the run reads
(``--model``, ``--dataset``, ``--config`` ...) is ever removed: such a run is refused before it
touches a file. Rank 0 decides and every rank learns the outcome (one broadcast), so under
``torchrun`` nobody waits for a rank that refused. The lock (``run_lock.py``) is held from here
until the run ends.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from upo.rewards import parse_reward_spec
from upo.train.checkpoints import checkpoint_step, latest_checkpoint, resolve_resume
from upo.train.config import TrainConfig
from upo.train.errors import UserError
from upo.train.run_lock import RunLock
from upo.train.runtime import Runtime, broadcast_from_main

# What a run writes (ref_logps/ is a cache keyed by content: it survives --overwrite).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "plot.png", "checkpoints", "model",
             "generations.jsonl")
# A run that never reached its first checkpoint leaves only these: --resume auto starts it over.
NOTHING_TO_RESUME = {"config.json", "metrics.jsonl"}


@dataclass
class ClaimedOutputDir:
    """The claimed folder: the checkpoint to resume from (None: a fresh start) and, on rank 0, the lock."""

    path: Path
    resume_path: Path | None
    lock: RunLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def claim_output_dir(config: TrainConfig, runtime: Runtime, log) -> ClaimedOutputDir:
    """Lock and check ``--output-dir`` on rank 0, resolve ``--resume``; every rank gets the same answer."""
    folder = Path(config.output_dir).expanduser()
    lock, failure, verdict = None, None, None
    if runtime.is_main:
        try:
            lock, resume_path = _claim(folder, config, log)
            verdict = ("ok", None if resume_path is None else str(resume_path))
        except Exception as err:  # also a bug: the other ranks must not wait for a broadcast that never comes
            failure, verdict = err, ("error", str(err))
    verdict = broadcast_from_main(verdict, runtime)
    if failure is not None:
        raise failure
    if verdict[0] == "error":
        raise UserError(verdict[1], reported_by_main=True)
    return ClaimedOutputDir(folder, None if verdict[1] is None else Path(verdict[1]), lock)


def _claim(folder: Path, config: TrainConfig, log) -> tuple[RunLock, Path | None]:
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output-dir {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output-dir {folder}: cannot create it ({err.strerror or err})") from None
    lock = RunLock(folder).acquire()
    try:
        resume_path = resolve_resume(config.resume, folder)
        _check_one_run(folder, config, resume_path, log)
    except BaseException:
        lock.release()
        raise
    return lock, resume_path


def run_files(folder: Path) -> list[str]:
    """The run outputs present in ``folder`` (empty folders, and a checkpoints/ holding only the temporary
    file of a write cut short, do not count)."""
    present = []
    for name in RUN_FILES:
        path = folder / name
        if name == "checkpoints":
            if latest_checkpoint(folder) is not None:
                present.append(name)
        elif path.is_file() or (path.is_dir() and any(path.iterdir())):
            present.append(name)
    return present


def describe_run(folder: Path, present: list[str]) -> str:
    parts = []
    for name in present:
        if name == "metrics.jsonl":
            with open(folder / name, "rb") as f:
                parts.append(f"metrics.jsonl ({sum(1 for _ in f)} steps logged)")
        elif name == "checkpoints":
            latest = latest_checkpoint(folder)
            parts.append(f"checkpoints/ (latest: step {checkpoint_step(latest)})" if latest else "checkpoints/")
        else:
            parts.append(name + ("/" if (folder / name).is_dir() else ""))
    return ", ".join(parts)


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def _check_one_run(folder: Path, config: TrainConfig, resume_path: Path | None, log) -> None:
    present = run_files(folder)
    if resume_path is not None and _inside(resume_path, folder):
        return  # continuing the run this folder holds
    if not present:
        return
    what = describe_run(folder, present)
    if config.overwrite:
        refuse_removing_inputs(folder, present, config, "--overwrite")
        clear_run_files(folder, present)
        log(f"note: --overwrite: removed the previous run in {folder} ({what})")
        return
    if resume_path is None and config.resume == "auto" and set(present) <= NOTHING_TO_RESUME:
        refuse_removing_inputs(folder, present, config, "--resume auto (starting over)")
        clear_run_files(folder, present)  # also the temporary file of a first checkpoint cut short
        log(f"note: {folder} holds no checkpoint to resume ({what}): starting over")
        return
    if config.resume == "auto":
        raise UserError(f"--output-dir {folder} holds a run with no checkpoint to resume ({what}); replace it "
                        "with --overwrite (instead of --resume), or choose another --output-dir")
    if resume_path is not None:
        raise UserError(f"--output-dir {folder} holds another run ({what}); resuming {resume_path} there would "
                        "mix the two: choose another (or an empty) --output-dir")
    raise UserError(f"--output-dir {folder} already holds a run ({what}); continue it with --resume auto, "
                    "or replace it with --overwrite")


def run_inputs(config: TrainConfig) -> dict[str, Path]:
    """The local files and folders the run reads, by the flag that names them (hub ids and built-in names are not
    paths here and are left out)."""
    named = {"--config": config.config_file, "--model": config.model, "--ref-model": config.ref_model,
             "--dataset": config.dataset, "--eval-dataset": config.eval_dataset,
             "--resume": None if config.resume == "auto" else config.resume}
    if isinstance(config.model_config, str) and not config.model_config.lstrip().startswith("{"):
        named["--model-config"] = config.model_config
    for spec in config.aux_reward:
        try:
            parsed = parse_reward_spec(spec)
        except (TypeError, ValueError):  # a bad spec is reported by the objective's own check
            continue
        if parsed.name == "lexicon" and parsed.arg:
            named[f"--aux-reward {spec}"] = parsed.arg
    paths = {flag: Path(value).expanduser() for flag, value in named.items() if isinstance(value, str) and value}
    return {flag: path for flag, path in paths.items() if path.exists()}


def refuse_removing_inputs(folder: Path, present: list[str], config: TrainConfig, why: str) -> None:
    """A one-line refusal, before anything is removed, when clearing ``present`` from ``folder`` would remove a
    file or folder this run reads (``--model out/model --overwrite`` would delete the model it is about to load)."""
    doomed = [(folder / name).resolve() for name in present]
    for flag, path in run_inputs(config).items():
        target = path.resolve()
        hit = next((d for d in doomed if d == target or d in target.parents), None)
        if hit is not None:
            raise UserError(f"{flag} {path} is inside {folder}/{hit.name}, which {why} would remove before the run "
                            f"reads it: move it out of --output-dir {folder}, or choose another --output-dir")


def clear_run_files(folder: Path, present: list[str]) -> None:
    for name in present:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for leftover in [*folder.glob(".*.tmp-*"), *folder.glob("checkpoints/.*.tmp-*")]:  # writes a kill cut short
        leftover.unlink()
