"""``upo-frontier``: does UPO trade user preference for designer reward better than relabelling the pairs?

Trains a grid of ``upo-train`` runs on the same data, split, seed and steps (UPO over a range of
lambda for each base loss, and the base loss alone on pairs relabelled towards the designer reward
at several mixing levels), measures each on the held-out pairs and, with ``--generate``, on what it
writes, and writes ``frontier.json`` and ``frontier.png``. With ``--model`` (a pretrained model) a
shared SFT stage is trained first and every run trains LoRA adapters on it, ``--seeds`` times; the reference's
completions must show the designer's trait (``--trait``) at a rate in ``--trait-rate`` before any run trains, and
UPO is compared with relabelling only where relabelling at ``m = 1`` moved the designer reward (gates.py). Flags
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
# With --model: the designer wants no stock openers and closers, a trait a chat model's own writing varies in
# (docs/frontier.md#a-pretrained-model); a completion shows it when its filler score is > 0.
MODEL_AUX_REWARD = ["filler:-1.0"]
MODEL_TRAIT = ["filler:1.0"]
MODEL_DATASET, MODEL_PROMPTS = "preferences_filler_chat.jsonl", "frontier_prompts.txt"
RESULT_FILES = ("frontier.json", "frontier.png")
TINY_SFT_LR = 1e-3
EXIT_GATE = 3  # the trait-rate gate stopped the study before its grid


def _numbers(values) -> str:
    return ",".join(f"{v:g}" for v in values)


# With --model (a pretrained model: SFT stage, then LoRA runs), what the flags left unset default to: the powered
# grid of issue 31 (3 seeds, 48 steps, 60 prompts with 2 samples each at temperature 1, greedy completions of 16 as
# a diagnostic, SFT for 3 passes). Its time on the 2-core CPU is in docs/frontier.md#a-pretrained-model; cut grid
# points (--bases, --lambdas) before seeds or prompts to fit a budget.
MODEL_DEFAULTS = {"steps": 48, "seeds": 3, "sft_passes": 3.0, "sft_lr": 5e-4, "generate": 60,
                  "generate_max_tokens": 48, "generate_samples": 2, "generate_temperature": 1.0, "generate_greedy": 16,
                  "lambdas": "0,1,3", "mixes": "0.5,1"}  # m = 0 trains the policy as lambda = 0 does
TOY_DEFAULTS = {"steps": DEFAULT_STEPS, "seeds": 1, "sft_steps": 0, "sft_lr": TINY_SFT_LR, "generate": 0,
                "generate_max_tokens": 64, "generate_samples": 1, "generate_temperature": 0.0, "generate_greedy": 0,
                "lambdas": _numbers(DEFAULT_LAMBDAS), "mixes": _numbers(DEFAULT_MIXES)}
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
                "(each upo-train run). Exit status: 0 finished, 1 a bug in upo, 2 a user mistake, 3 the trait-rate "
                "gate stopped the study before its grid (frontier.json says why).")
    p.add_argument("--model", help="the model of every run, as upo-train's --model (a folder, a Hugging Face id, a "
                   ".gguf file, smollm2). A pretrained model is first fine-tuned once on the training responses "
                   "(the SFT stage, the reference of every run), then each run trains LoRA adapters on it "
                   "(default: upo-train's built-in tiny model, from random weights, no SFT stage)")
    p.add_argument("--dataset", help="preference data (as upo-train's --dataset, or the name of a file shipped in "
                   f"upo/resources; default: with --model and a chat template {MODEL_DATASET}, where filler "
                   "disagrees with the label on 50%% of the pairs; else preferences_conflict.jsonl, where readability "
                   "does on 60%%)")
    p.add_argument("--dataset-split", default="train", help="split of a Hugging Face dataset (default: train)")
    p.add_argument("--max-examples", type=int, help="use only the first N rows")
    p.add_argument("--eval-fraction", type=float, default=DEFAULT_EVAL_FRACTION,
                   help=f"held-out share of the pairs, the same split for every run (default: {DEFAULT_EVAL_FRACTION})")
    p.add_argument("--aux-reward", action="append", metavar="SPEC",
                   help="the designer reward, as upo-train's --aux-reward, repeatable: UPO's auxiliary reward, the "
                   f"relabelling's target and the measure (default: {' '.join(DEFAULT_AUX_REWARD)}; "
                   f"{' '.join(MODEL_AUX_REWARD)} with --model)")
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
                   "(default: 0; with --model the steps of --sft-passes)")
    p.add_argument("--sft-passes", type=float, help="with --model and no --sft-steps: the SFT stage's passes over "
                   f"its rows, at the runs' batch size (default: {MODEL_DEFAULTS['sft_passes']:g})")
    p.add_argument("--sft-lr", type=float, help=f"learning rate of the SFT stage (default: {TINY_SFT_LR:g}; "
                   f"{MODEL_DEFAULTS['sft_lr']:g} with --model)")
    p.add_argument("--generate", type=int, metavar="N",
                   help="score the policy's completions of the first N held-out prompts (the held-out pairs', then "
                   "--generate-prompts'): designer and user reward, length, degenerate share, KL estimate "
                   f"(default: 0, off; {MODEL_DEFAULTS['generate']} with --model)")
    p.add_argument("--generate-prompts", metavar="FILE", help="more held-out prompts without labels, one question "
                   f"per line, after the held-out pairs' (default: none; with --model the shipped {MODEL_PROMPTS}; "
                   "'none': none)")
    p.add_argument("--generate-samples", type=int, metavar="K", help="completions per prompt (default: 1; "
                   f"{MODEL_DEFAULTS['generate_samples']} with --model, sampled at temperature 1, where the KL "
                   "estimate is unbiased)")
    p.add_argument("--generate-max-tokens", type=int, metavar="M", help="new tokens per completion (default: "
                   f"{TOY_DEFAULTS['generate_max_tokens']}; {MODEL_DEFAULTS['generate_max_tokens']} with --model)")
    p.add_argument("--generate-temperature", type=float, metavar="T",
                   help="0: greedy; > 0: sampled, seeded by the run's seed (default: 0; "
                   f"{MODEL_DEFAULTS['generate_temperature']:g} with --model)")
    p.add_argument("--generate-greedy", type=int, metavar="G", help="with a temperature > 0, also greedy completions "
                   "of the first G prompts, a diagnostic reported beside the measures (*_greedy) (default: 0; "
                   f"{MODEL_DEFAULTS['generate_greedy']} with --model)")
    p.add_argument("--trait", action="append", metavar="SPEC", help="the designer's trait, in --aux-reward's grammar, "
                   "repeatable: a completion shows it when its score is > 0. Before the grid the reference's "
                   "completions must show it at a rate within --trait-rate, else the grid is not run (exit status "
                   f"3) (default: none; {' '.join(MODEL_TRAIT)} with --model and its default --aux-reward)")
    p.add_argument("--trait-rate", default="0.3,0.7", metavar="LOW,HIGH",
                   help="the share of the reference's completions that must show --trait (default: 0.3,0.7)")
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
    if args.sft_passes is not None:  # the passes set the SFT stage's steps, with or without --model
        args.sft_steps = None
    for name, value in (MODEL_DEFAULTS if pretrained else TOY_DEFAULTS).items():
        if getattr(args, name) is None and not (name == "sft_steps" and args.sft_passes is not None):
            setattr(args, name, value)
    if args.dataset is None:
        chat = pretrained and _has_chat_template(args.model)
        name = MODEL_DATASET if chat else "preferences_conflict.jsonl"
        args.dataset = str(RESOURCES_DIR / name)
    elif not Path(args.dataset).expanduser().exists() and (RESOURCES_DIR / args.dataset).is_file():
        args.dataset = str(RESOURCES_DIR / args.dataset)  # a shipped file by its name
    if args.trait is None and pretrained and args.aux_reward is None:
        args.trait = list(MODEL_TRAIT)  # the default designer's trait; another designer names its own
    args.aux_reward = args.aux_reward or list(MODEL_AUX_REWARD if pretrained else DEFAULT_AUX_REWARD)
    args.user_reward = args.user_reward or list(DEFAULT_USER_REWARD)
    if args.generate_prompts is None and pretrained:
        args.generate_prompts = str(RESOURCES_DIR / MODEL_PROMPTS)
    if args.generate_prompts == "none":
        args.generate_prompts = None
    args.trait_rate = parse_trait_rate(args.trait_rate)


def _has_chat_template(model: str) -> bool:
    from upo.pretrained import load_tokenizer
    from upo.train.data import has_chat_template

    try:
        return has_chat_template(load_tokenizer(model))
    except (ValueError, OSError) as err:
        raise UserError(f"--model {model}: {err}") from None


def parse_trait_rate(text: str) -> tuple[float, float]:
    """``--trait-rate LOW,HIGH``: two shares, ``0 <= LOW < HIGH <= 1``."""
    values = parse_numbers(text, "--trait-rate", 0.0, 1.0)
    if len(values) != 2 or values[0] >= values[1]:
        raise UserError(f"--trait-rate must be two shares LOW,HIGH with LOW < HIGH (e.g. 0.3,0.7), got {text}")
    return values[0], values[1]


def check_args(args) -> None:
    """The flags as given (None: left to :func:`fill_defaults`)."""
    checks = [("--steps", args.steps, 1), ("--generate", args.generate, 0),
              ("--generate-max-tokens", args.generate_max_tokens, 1), ("--seeds", args.seeds, 1),
              ("--sft-steps", args.sft_steps, 0), ("--max-examples", args.max_examples, 2),
              ("--generate-samples", args.generate_samples, 1), ("--generate-greedy", args.generate_greedy, 0)]
    for name, value, least in checks:
        if value is not None and value < least:
            raise UserError(f"{name} must be an integer >= {least}, got {value}")
    if not 0 < args.eval_fraction < 1:
        raise UserError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    if args.sft_lr is not None and not (math.isfinite(args.sft_lr) and args.sft_lr > 0):
        raise UserError(f"--sft-lr must be a finite number > 0, got {args.sft_lr}")
    if args.sft_passes is not None and not (math.isfinite(args.sft_passes) and args.sft_passes > 0):
        raise UserError(f"--sft-passes must be a finite number > 0, got {args.sft_passes}")
    if args.sft_passes is not None and args.sft_steps is not None:
        raise UserError("give --sft-steps or --sft-passes, not both")
    if args.generate_temperature is not None and not args.generate_temperature >= 0:
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
    if args.generate_samples > 1 and args.generate_temperature == 0:
        raise UserError(f"--generate-samples {args.generate_samples} needs --generate-temperature > 0: greedy "
                        "completions of a prompt are all the same")
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
    trait = build_reward(args.trait, "--trait") if args.trait else None
    return prepare_study(args, reward, runs, settings, train_args, user_reward, trait), args


def run_study(study, progress: bool, log) -> dict:
    """Every run in turn under one progress bar, then ``frontier.json`` and ``frontier.png``."""
    from tqdm.auto import tqdm

    from upo.frontier.reference_generations import TraitGateFailed, measure_references
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
    try:
        measure_references(study, runtime, log)  # and the trait-rate gate, before any run trains
    except TraitGateFailed:
        write_json(study_report(study, [], time.perf_counter() - clock, started), study.output_dir / "frontier.json")
        raise
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
    if report["comparison"] is not None:
        log(report["comparison"]["verdict"])
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

    from upo.frontier.reference_generations import TraitGateFailed
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
    except TraitGateFailed as gate:
        print(f"{PROG}: trait-rate gate: {gate}: the grid was not run (a trait the model does not vary in leaves "
              f"the designer reward nothing to trade); wrote {study.output_dir / 'frontier.json'}",
              file=sys.stderr, flush=True)
        return EXIT_GATE
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
