"""``upo-frontier``: does UPO trade user preference for designer reward better than relabelling the pairs?

Trains a grid of ``upo-train`` runs on the same data, split, seed and steps (UPO over a range of
lambda for each base loss, and the base loss alone on pairs relabelled towards the designer reward
at several mixing levels), measures each on the held-out pairs and, with ``--generate``, on what it
writes, and writes ``frontier.json`` and ``frontier.png``. With ``--model`` (a pretrained model) a
shared SFT stage is trained first and every run trains LoRA adapters on it, ``--seeds`` times. Flags
after ``--`` go to every ``upo-train`` run unchanged (its UPO-only flags to the UPO runs only). User
mistakes end with one line ``upo-frontier: error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path

from upo.frontier.grid import (DEFAULT_BASES, DEFAULT_LAMBDAS, DEFAULT_METHODS, DEFAULT_MIXES, METHODS, build_grid,
                               check_bases, parse_names, parse_numbers)
from upo.train.allocator import CHOICE_ENV, CHOICES, allocator_in_use, runs_on_cpu, use_allocator
from upo.train.errors import EXIT_USER_ERROR, RunStopped, StopNow, UserError

PROG = "upo-frontier"
DEFAULT_STEPS = 60
DEFAULT_EVAL_FRACTION = 0.2
DEFAULT_AUX_REWARD = ["readability:1.0"]
DEFAULT_USER_REWARD = ["lexicon:hedging:-1.0"]  # the shipped conflict data's label: direct beats hedged
RESULT_FILES = ("frontier.json", "frontier.png")
TINY_SFT_LR = 1e-3


def _numbers(values) -> str:
    return ",".join(f"{v:g}" for v in values)


# With --model (a pretrained model: SFT stage, then LoRA runs), what the flags left unset default to; sized so
# that the default grid fits 60 minutes on a 2-core CPU (docs/frontier.md#a-pretrained-model).
MODEL_DEFAULTS = {"steps": 16, "seeds": 2, "sft_steps": 40, "sft_lr": 5e-4, "generate": 16, "generate_max_tokens": 48,
                  "lambdas": "0,0.3,1,3", "mixes": "0.5,1"}  # m = 0 trains the policy as lambda = 0 does
TOY_DEFAULTS = {"steps": DEFAULT_STEPS, "seeds": 1, "sft_steps": 0, "sft_lr": TINY_SFT_LR, "generate": 0,
                "generate_max_tokens": 64, "lambdas": _numbers(DEFAULT_LAMBDAS), "mixes": _numbers(DEFAULT_MIXES)}
# The SFT stage's and LoRA runs' upo-train settings with --model, under the user's flags after --.
MODEL_TRAIN_DEFAULTS = {"lr": 5e-4, "batch_size": 4, "warmup_steps": 2}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    from upo.rewards import RESOURCES_DIR

    p = _Parser(prog=PROG, usage="%(prog)s [options] [-- upo-train flags]",
                description="Does UPO trade user preference for designer reward better than relabelling the "
                "pairs? Trains a grid of upo-train runs and measures each on the held-out pairs.",
                epilog="Example: upo-frontier --lambdas 0,1,10 --mixes 0,0.5,1 -- --beta 0.1 --lr 1e-3. "
                "Outputs: frontier.json, frontier.png, data/ (the split, relabelled training files), runs/<name>/ "
                "(each upo-train run). Exit status: 0 finished, 1 a bug in upo, 2 a user mistake.")
    p.add_argument("--model", help="the model of every run, as upo-train's --model (a folder, a Hugging Face id, a "
                   ".gguf file, smollm2). A pretrained model is first fine-tuned once on the training responses "
                   "(the SFT stage, the reference of every run), then each run trains LoRA adapters on it "
                   "(default: upo-train's built-in tiny model, from random weights, no SFT stage)")
    p.add_argument("--dataset", help="preference data (as upo-train's --dataset; default: for a model with a chat "
                   "template the shipped conversational conflict data, preferences_conflict_chat.jsonl, where "
                   "readability disagrees with the label on 50%% of the pairs; else preferences_conflict.jsonl, "
                   "60%%)")
    p.add_argument("--dataset-split", default="train", help="split of a Hugging Face dataset (default: train)")
    p.add_argument("--max-examples", type=int, help="use only the first N rows")
    p.add_argument("--eval-fraction", type=float, default=DEFAULT_EVAL_FRACTION,
                   help=f"held-out share of the pairs, the same split for every run (default: {DEFAULT_EVAL_FRACTION})")
    p.add_argument("--aux-reward", action="append", metavar="SPEC",
                   help="the designer reward, as upo-train's --aux-reward, repeatable: UPO's auxiliary reward, the "
                   f"relabelling's target and the measure (default: {' '.join(DEFAULT_AUX_REWARD)})")
    p.add_argument("--user-reward", action="append", metavar="SPEC",
                   help="the user's preference as a known scorer of the generations, in --aux-reward's grammar, "
                   f"repeatable (default: {' '.join(DEFAULT_USER_REWARD)}: the share of hedging words, negated)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, of {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--bases", default=",".join(DEFAULT_BASES),
                   help=f"base preference losses (default: {','.join(DEFAULT_BASES)})")
    p.add_argument("--lambdas",
                   help=f"UPO's lambda values, >= 0 (default: {TOY_DEFAULTS['lambdas']}; "
                   f"{MODEL_DEFAULTS['lambdas']} with --model; 0 is the base loss)")
    p.add_argument("--mixes",
                   help="relabelling levels in [0, 1]: the share of the training pairs whose designer reward "
                   f"disagrees with the label that get swapped (default: {TOY_DEFAULTS['mixes']}; "
                   f"{MODEL_DEFAULTS['mixes']} with --model, whose lambda = 0 run is the base loss on the user's "
                   "labels)")
    p.add_argument("--steps", type=int,
                   help=f"optimiser steps per run (default: {DEFAULT_STEPS}; {MODEL_DEFAULTS['steps']} with --model)")
    p.add_argument("--seed", type=int, default=0, help="the first seed: the split, the SFT stage; run k of a grid "
                   "point has seed + k (model init or LoRA init, data order, relabelling)")
    p.add_argument("--seeds", type=int, help="seeds per grid point: each run is trained and measured once per seed "
                   f"(default: 1; {MODEL_DEFAULTS['seeds']} with --model)")
    p.add_argument("--sft-steps", type=int, help="steps of the shared SFT stage on the training responses (both "
                   "sides of every pair), trained once and the start and reference of every run; 0: none "
                   f"(default: 0; {MODEL_DEFAULTS['sft_steps']} with --model)")
    p.add_argument("--sft-lr", type=float, help=f"learning rate of the SFT stage (default: {TINY_SFT_LR:g}; "
                   f"{MODEL_DEFAULTS['sft_lr']:g} with --model)")
    p.add_argument("--generate", type=int, metavar="N",
                   help="score the policy's completions of the first N held-out prompts: designer and user reward, "
                   "length, degenerate share, KL estimate (default: 0, off; "
                   f"{MODEL_DEFAULTS['generate']} with --model)")
    p.add_argument("--generate-max-tokens", type=int, metavar="M", help="new tokens per completion (default: "
                   f"{TOY_DEFAULTS['generate_max_tokens']}; {MODEL_DEFAULTS['generate_max_tokens']} with --model)")
    p.add_argument("--generate-temperature", type=float, default=0.0, metavar="T",
                   help="0: greedy (default); > 0: sampled, seeded by --seed")
    p.add_argument("--output-dir", default="./frontier-output", help="default: ./frontier-output")
    p.add_argument("--overwrite", action="store_true", help="replace the results (and runs) a previous grid left there")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--allocator", choices=CHOICES, help="memory allocator, as upo-train's: auto = without a CUDA "
                   "device tcmalloc, else jemalloc, where the system has one (upo-frontier restarts in place with it "
                   f"preloaded), system = the C library's malloc; {CHOICE_ENV} in the environment sets the default "
                   "(default: auto)")
    return p


def fill_defaults(args) -> None:
    """The defaults that depend on the model: the toy study's without --model, MODEL_DEFAULTS with it; the data
    by whether the model's tokenizer has a chat template."""
    from upo.rewards import RESOURCES_DIR

    pretrained = args.model is not None
    for name, value in (MODEL_DEFAULTS if pretrained else TOY_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.dataset is None:
        chat = pretrained and _has_chat_template(args.model)
        name = "preferences_conflict_chat.jsonl" if chat else "preferences_conflict.jsonl"
        args.dataset = str(RESOURCES_DIR / name)
    args.aux_reward = args.aux_reward or list(DEFAULT_AUX_REWARD)
    args.user_reward = args.user_reward or list(DEFAULT_USER_REWARD)


def _has_chat_template(model: str) -> bool:
    from upo.pretrained import load_tokenizer
    from upo.train.data import has_chat_template

    try:
        return has_chat_template(load_tokenizer(model))
    except (ValueError, OSError) as err:
        raise UserError(f"--model {model}: {err}") from None


def check_args(args) -> None:
    """The flags as given (None: left to :func:`fill_defaults`)."""
    checks = [("--steps", args.steps, 1), ("--generate", args.generate, 0),
              ("--generate-max-tokens", args.generate_max_tokens, 1), ("--seeds", args.seeds, 1),
              ("--sft-steps", args.sft_steps, 0), ("--max-examples", args.max_examples, 2)]
    for name, value, least in checks:
        if value is not None and value < least:
            raise UserError(f"{name} must be an integer >= {least}, got {value}")
    if not 0 < args.eval_fraction < 1:
        raise UserError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    if args.sft_lr is not None and not (math.isfinite(args.sft_lr) and args.sft_lr > 0):
        raise UserError(f"--sft-lr must be a finite number > 0, got {args.sft_lr}")
    if not args.generate_temperature >= 0:
        raise UserError(f"--generate-temperature must be >= 0, got {args.generate_temperature}")
    out = Path(args.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file, not a folder")
    held = [name for name in RESULT_FILES if (out / name).exists()]
    if held and not args.overwrite:
        raise UserError(f"--output-dir {out} holds the results of another grid ({', '.join(held)}): "
                        "choose another folder or pass --overwrite")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``upo-frontier`` flags, and the ``upo-train`` flags after the first ``--``."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def passed_train_settings(train_args: list[str]) -> dict:
    """The ``upo-train`` flags (and their ``--config`` file) as settings, parsed and checked by upo-train."""
    from upo.frontier.study import check_passed_settings
    from upo.train.cli import build_parser as train_parser
    from upo.train.config_file import load_config_file

    parser = train_parser()
    try:
        flags = vars(parser.parse_args(train_args))
    except UserError as err:
        raise UserError(f"upo-train flags after --: {err}") from None
    config_path = flags.pop("config", None)
    file_settings, _ = load_config_file(config_path, parser) if config_path else ({}, {})
    check_passed_settings(file_settings, f"--config {config_path}")
    check_passed_settings(flags, "the upo-train flags after --")
    return {**file_settings, **flags}


def plan(argv: list[str]):
    """Parse and check everything, load and split the data: the study, ready to run."""
    from upo.frontier.study import prepare_study
    from upo.train.objective import build_reward

    own, train_args = split_argv(argv)
    args = build_parser().parse_args(own)
    check_args(args)  # before fill_defaults, which may read --model's tokenizer; its defaults pass these checks
    fill_defaults(args)
    methods = parse_names(args.methods, "--methods", "method", METHODS)
    bases = parse_names(args.bases, "--bases", "base loss")
    check_bases(bases)
    # both lists are checked, also the one a method left out of --methods does not read
    runs = build_grid(methods, bases, parse_numbers(args.lambdas, "--lambdas", 0.0),
                      parse_numbers(args.mixes, "--mixes", 0.0, 1.0))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("upo-frontier runs its grid in one process: run it without torchrun")
    settings = passed_train_settings(train_args)
    if args.model is not None:
        settings = {**MODEL_TRAIN_DEFAULTS, **settings}
    reward = build_reward(args.aux_reward)
    user_reward = build_reward(args.user_reward, "--user-reward")
    return prepare_study(args, reward, runs, settings, train_args, user_reward), args


def run_study(study, progress: bool, log) -> dict:
    """Every run in turn under one progress bar, then ``frontier.json`` and ``frontier.png``."""
    from tqdm.auto import tqdm

    from upo.frontier.report import plot_frontier, write_json
    from upo.frontier.study import prepare_sft, run_config, run_one, study_report
    from upo.train.cli import _limit_threads_for_tiny_models
    from upo.train.runtime import setup_runtime

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # each run loads the SFT stage's folder: no "Loading weights" bar per run
    started, clock = datetime.datetime.now(), time.perf_counter()
    first = run_config(study, study.runs[0], study.eval_path)
    runtime = setup_runtime(first.device)
    _limit_threads_for_tiny_models(first, runtime.device)
    results = []
    prepare_sft(study, runtime, log)
    grid = [(seed, spec) for seed in study.seeds for spec in study.runs]
    bar = tqdm(grid, desc=PROG, unit="run", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    for seed, spec in bar:
        bar.set_postfix_str(f"{spec.name} seed {seed}", refresh=True)
        run = run_one(study, spec, runtime, seed, lambda message: log(message, bar))
        results.append(run)
        log(f"{spec.name} seed {seed}: {describe(run)} ({run['wall_seconds']:.0f} s)", bar)
    bar.close()
    report = study_report(study, results, time.perf_counter() - clock, started)
    write_json(report, study.output_dir / "frontier.json")
    plot_frontier(report, study.output_dir / "frontier.png")
    return report


def describe(run: dict) -> str:
    text = (f"preference accuracy {run['preference_accuracy']:.3f}, designer reward of the preferred response "
            f"{run['aux_reward_preferred']:.3f}, kl {run['kl']:.3f}")
    if run.get("user_reward_generated") is not None:
        kl = "n/a" if run["kl_generated"] is None else f"{run['kl_generated']:.2f}"
        text += (f"; generations: designer {run['aux_reward_generated']:.3f}, user {run['user_reward_generated']:.3f}, "
                 f"{run['length_generated']:.1f} tokens, degenerate {run['degenerate_share_generated']:.2f}, "
                 f"kl {kl}")
    return text


def _log(message: str, bar=None) -> None:
    if bar is not None and not bar.disable:
        bar.write(f"{PROG}: {message}", file=sys.stderr)
    else:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _use_allocator(argv: list[str]) -> str | None:
    """Restart in place on tcmalloc or jemalloc (upo/train/allocator.py) before the grid loads anything; the note
    to print when auto found none. The grid's runs share this process and so its allocator."""
    return use_allocator(build_parser().parse_args(split_argv(argv)[0]).allocator, runs_on_cpu("auto"))[1]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``upo-frontier`` and ``python -m upo.frontier``; returns the exit status."""
    from upo.heads import UnsupportedModelError

    from upo.train.signals import StopRequests

    try:
        with StopRequests(defer=False):  # between runs a stop signal ends the grid at once, with a line
            note = _use_allocator(sys.argv[1:]) if argv is None else None  # a command, not a call
            study, args = plan(sys.argv[1:] if argv is None else list(argv))
            sft = f"an SFT stage of {study.sft.steps} steps, then " if study.sft else ""
            _log(f"{sft}{len(study.runs)} runs x {len(study.seeds)} seed(s) of {study.steps} steps, "
                 f"{len(study.train_rows)} train / {len(study.held_out.prompts)} held-out pairs -> {study.output_dir}"
                 f"; memory allocator {allocator_in_use().describe()}")
            if note:
                _log(note)
            report = run_study(study, args.progress, _log)
        print(f"{PROG}: {len(report['runs'])} runs (and seeds) in {report['wall_seconds']:.0f} s; wrote "
              f"{study.output_dir / 'frontier.json'} and {study.output_dir / 'frontier.png'}", flush=True)
        return 0
    except SystemExit as exit_request:  # --help
        return int(exit_request.code or 0)
    except (UserError, UnsupportedModelError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except (RunStopped, StopNow) as stop:  # a stop signal: the grid is incomplete, so no results are written
        print(f"{PROG}: stopped by a signal before the grid finished; no frontier.json was written (the finished "
              "runs are in runs/; start the grid again with --overwrite)", file=sys.stderr, flush=True)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
