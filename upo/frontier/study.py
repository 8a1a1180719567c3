"""One frontier study: split and score the data once, train the SFT stage once (sft.py), then every run of
the grid for every seed in turn, and measure each.

Runs are ``upo-train`` runs driven in-process (:class:`upo.train.trainer.Trainer`), one after the
other, each in ``<output-dir>/runs/<name>-seed<k>/``. Their settings are the user's ``upo-train`` flags
(passed through unchanged, so a new ``upo-train`` flag needs no code here) plus what the frontier
fixes per run: the model (the SFT stage's, with LoRA for a pretrained model), the loss, UPO's lambda,
the data, the steps and the seed.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from upo.frontier.compare import compare
from upo.frontier.generated import Scorers, measure_completions
from upo.frontier.grid import RunSpec, disagreeing_pairs, relabel, write_rows
from upo.frontier.prompts import load_questions, prompt_rows, render_prompts
from upo.frontier.report import summarize
from upo.frontier.measure import GenerateSettings, HeldOut, attainable_frontier, pair_metrics
from upo.frontier.sft import run_sft, sft_config, sft_model_dir
from upo.train.config import UPO_SETTINGS, TrainConfig, build_config
from upo.train.data import ByteTokenizer, load_records, render_record, split_train_eval
from upo.train.errors import UserError
from upo.train.signals import stop_if_signalled

# Settings the frontier sets itself: refused among the passed-through upo-train flags.
OWNED_SETTINGS = {
    "dataset": "--dataset", "dataset_split": "--dataset-split", "max_examples": "--max-examples",
    "eval_fraction": "--eval-fraction", "seed": "--seed", "max_steps": "--steps", "aux_reward": "--aux-reward",
    "output_dir": "--output-dir", "overwrite": "--overwrite", "progress": "--no-progress",
    "eval_generate": "--generate", "eval_generate_max_tokens": "--generate-max-tokens",
    "eval_generate_temperature": "--generate-temperature",
    "loss_type": "--bases and --methods", "upo_lambda": "--lambdas", "epochs": "--steps",
    "eval_dataset": "--dataset and --eval-fraction", "eval_split": "--dataset and --eval-fraction",
    "eval_max_pairs": "--eval-fraction", "resume": "(a fresh grid every time)", "model": "--model",
    "allocator": "--allocator",  # the runs share upo-frontier's process
}


@dataclass(frozen=True)
class SftSettings:
    steps: int
    lr: float
    passes: float | None = None  # the passes over its examples that set steps (None: --sft-steps did)


@dataclass
class Study:
    output_dir: Path
    dataset: str
    aux_reward: list[str]  # the designer reward's specs (upo-train's --aux-reward of the UPO runs)
    reward: object  # their CombinedReward
    steps: int
    seed: int
    train_rows: list[dict]
    train_aux: tuple[list[float], list[float]]
    eval_path: str
    held_out: HeldOut
    runs: list[RunSpec]
    train_settings: dict  # the passed-through upo-train flags (and config file), frontier defaults under them
    generate: GenerateSettings | None
    overwrite: bool = False
    train_args: list[str] = field(default_factory=list)
    model: str | None = None  # --model: None for the built-in tiny model
    seeds: list[int] = field(default_factory=lambda: [0])
    sft: SftSettings | None = None  # None: no SFT stage, every run starts from --model itself
    user_reward_specs: list[str] = field(default_factory=list)
    user_reward: object = None  # the user's preference as a scorer of generations (a CombinedReward)
    sft_report: dict | None = None
    reference_generations: dict = field(default_factory=dict)  # seed (0 for a shared reference) -> summary
    prompt_rows: list[dict] = field(default_factory=list)  # the rows whose prompts are completed (prompts.py)
    prompts_file: str | None = None  # --generate-prompts
    trait_specs: list[str] = field(default_factory=list)  # --trait: a score > 0 marks the designer's trait
    trait: object = None  # their CombinedReward (None: no trait-rate gate)
    trait_rate: tuple[float, float] = (0.3, 0.7)  # --trait-rate
    trait_gate: dict | None = None  # the trait-rate gate's result (reference_generations.py)

    @property
    def scorers(self) -> Scorers:
        return Scorers(self.reward, self.user_reward, self.trait)

    @property
    def lora(self) -> bool:
        """LoRA on a pretrained model: the SFT stage's adapters (merged afterwards), and the grid's on it."""
        return self.model is not None


def check_passed_settings(settings: dict, where: str) -> None:
    for name in settings:
        if name in OWNED_SETTINGS:
            raise UserError(f"{where} sets {name.replace('_', '-')}, which upo-frontier sets itself "
                            f"(use upo-frontier's {OWNED_SETTINGS[name]})")


def score_rows(rows: list[dict], reward) -> tuple[list[str], list[float], list[float]]:
    """Plain prompts and the designer reward ``r_aux`` of each row's chosen and rejected response."""
    rendered = [render_record(row, ByteTokenizer(), f"row {i}") for i, row in enumerate(rows)]
    prompts = [pair.prompt_plain for pair in rendered]
    try:
        chosen, rejected = reward.score_pairs(prompts, [p.chosen_plain for p in rendered],
                                              [p.rejected_plain for p in rendered], rows)
    except ValueError as err:
        raise UserError(f"designer reward: {err}") from None
    return prompts, reward.combine(chosen).tolist(), reward.combine(rejected).tolist()


def dataset_label(dataset: str) -> str:
    """How ``frontier.json`` names the data: a shipped file by its place in the repository, others as given."""
    from upo.rewards import RESOURCES_DIR

    path = Path(dataset).expanduser()
    if path.is_file() and path.resolve().parent == RESOURCES_DIR:
        return f"upo/resources/{path.name}"
    return dataset


def sft_steps_for(passes: float, examples: int, train_settings: dict) -> int:
    """The SFT steps for ``passes`` passes over ``examples`` rows (every pair both ways) at the runs' batch size
    and gradient accumulation (upo-train's defaults where the flags after -- leave them)."""
    per_step = train_settings.get("batch_size", TrainConfig.batch_size) * train_settings.get("grad_accum",
                                                                                              TrainConfig.grad_accum)
    return max(1, math.ceil(passes * examples / per_step))


def prepare_study(args, reward, runs: list[RunSpec], train_settings: dict, train_args: list[str],
                  user_reward=None, trait=None) -> Study:
    """Load, split and score the data, write the held-out split, check every run's settings."""
    output_dir = Path(args.output_dir).expanduser()
    records = load_records(args.dataset, args.dataset_split).head(args.max_examples)
    rows = [dict(row) for row in records]
    train_idx, eval_idx = split_train_eval(len(rows), args.eval_fraction, args.seed)
    if not eval_idx:
        raise UserError(f"--eval-fraction {args.eval_fraction} of {len(rows)} pairs holds out none: raise it")
    train_rows, eval_rows = [rows[i] for i in train_idx], [rows[i] for i in eval_idx]
    _, *train_aux = score_rows(train_rows, reward)
    eval_prompts, eval_c, eval_r = score_rows(eval_rows, reward)
    generate = None
    if args.generate:
        generate = GenerateSettings(args.generate, args.generate_max_tokens, args.generate_temperature, args.seed,
                                    samples=args.generate_samples, greedy_prompts=args.generate_greedy)
    questions = load_questions(args.generate_prompts) if args.generate_prompts else []
    sft_steps = args.sft_steps
    if sft_steps is None:  # --sft-passes: steps for that many passes over the SFT stage's rows (each pair both ways)
        sft_steps = sft_steps_for(args.sft_passes, 2 * len(train_rows), train_settings)
    sft = SftSettings(sft_steps, args.sft_lr, None if args.sft_steps is not None else args.sft_passes)
    study = Study(output_dir, dataset_label(args.dataset), list(args.aux_reward), reward, args.steps, args.seed,
                  train_rows, tuple(train_aux), write_rows(eval_rows, output_dir / "data" / "eval.jsonl"),
                  HeldOut(eval_prompts, eval_c, eval_r), runs, train_settings, generate, args.overwrite, train_args,
                  model=args.model, seeds=[args.seed + k for k in range(args.seeds)],
                  sft=sft if sft_steps else None, user_reward_specs=list(args.user_reward), user_reward=user_reward,
                  prompt_rows=prompt_rows(eval_rows, questions, args.generate), prompts_file=args.generate_prompts,
                  trait_specs=list(args.trait or []), trait=trait, trait_rate=tuple(args.trait_rate))
    from upo.train.objective import check_loss_names, check_loss_options

    if study.sft is not None:
        sft_config(study, study.eval_path)
    for spec in runs:  # every run's settings, before the first one trains
        config = run_config(study, spec, dataset=study.eval_path)
        check_loss_names(config.loss_type)
        check_loss_options(config, list(reward.weights) if spec.method == "upo" else None)
    return study


def run_name(spec: RunSpec, seed: int) -> str:
    return f"{spec.name}-seed{seed}"


def run_config(study: Study, spec: RunSpec, dataset: str, seed: int | None = None) -> TrainConfig:
    """The run's ``upo-train`` settings: frontier defaults < passed-through flags < what the frontier fixes."""
    seed = study.seeds[0] if seed is None else seed
    settings = {"eval_every": study.steps, "save_every": study.steps, "keep_checkpoints": 1,
                **({"lora": True} if study.lora else {}), **study.train_settings}
    if spec.method != "upo":  # UPO's own settings would be refused (and do nothing) without 'upo'
        settings = {k: v for k, v in settings.items() if k not in UPO_SETTINGS}
    model = study.model
    if study.sft is not None:  # the SFT stage's folder is the model (--model-config built the tiny one it trained)
        model = str(sft_model_dir(study))
        settings.pop("model_config", None)
        settings = {"logit_check": False, **settings}  # the SFT stage checked this architecture's log-probs
    settings.update(dataset=dataset, eval_dataset=study.eval_path, loss_type=spec.loss_type, max_steps=study.steps,
                    seed=seed, model=model, output_dir=str(study.output_dir / "runs" / run_name(spec, seed)),
                    overwrite=study.overwrite, progress=False)
    if spec.method == "upo":
        settings.update(upo_lambda=spec.upo_lambda, aux_reward=list(study.aux_reward))
    return build_config({}, settings)


def train_data_for(study: Study, spec: RunSpec, seed: int) -> tuple[str, int]:
    """The training file of a run (relabelled for ``relabel``, seeded) and how many pairs were swapped."""
    if spec.method != "relabel":
        return write_rows(study.train_rows, study.output_dir / "data" / "train.jsonl"), 0
    rows, swapped = relabel(study.train_rows, *study.train_aux, spec.relabel_mix, seed)
    path = study.output_dir / "data" / f"seed{seed}" / f"train-mix{spec.relabel_mix:g}.jsonl"
    return write_rows(rows, path), len(swapped)


def prepare_sft(study: Study, runtime, log) -> None:
    """The SFT stage, trained once before the first run (every later run reuses its model folder)."""
    if study.sft is not None and study.sft_report is None:
        study.sft_report = run_sft(study, runtime)
        log(f"SFT stage: {study.sft.steps} steps in {study.sft_report['wall_seconds']:.0f} s, train loss "
            f"{study.sft_report['train_loss']:.3f}; every run starts from {study.sft_report['model']}")


def run_one(study: Study, spec: RunSpec, runtime, seed: int | None = None, log=None) -> dict:
    """Train one run of the grid for one seed and measure it on the held-out split (``log``: progress lines)."""
    from upo.train.trainer import Trainer

    seed = study.seeds[0] if seed is None else seed
    started = time.perf_counter()
    dataset, swapped = train_data_for(study, spec, seed)
    config = run_config(study, spec, dataset, seed)
    lines: list[str] = []
    trainer = Trainer(config, runtime, log=lines.append)
    summary = trainer.train()
    stop_if_signalled(trainer)
    clock = time.perf_counter()
    logps = trainer.sequence_logps(trainer.eval_indices)
    timings = {"measure_pairs": time.perf_counter() - clock}
    run = {"method": spec.method, "base": spec.base, "upo_lambda": spec.upo_lambda, "relabel_mix": spec.relabel_mix,
           "seed": seed, **pair_metrics(logps, trainer.eval_indices, study.held_out), "aux_reward_generated": None}
    if study.generate is not None:
        if log is not None:
            log(f"{spec.name} seed {seed}: trained in {summary['train_seconds']:.0f} s; generating")
        run.update(measure_generations(study, trainer, seed, timings, log))
    run.update(name=spec.name, timings={k: round(v, 2) for k, v in timings.items()},
               training=training_figures(trainer.history), swapped_pairs=swapped if spec.method == "relabel" else None,
               eval_rewards_accuracies=summary["eval"].get("rewards/accuracies"),
               train_loss=summary["train"].get("loss"), train_seconds=round(summary["train_seconds"], 2),
               wall_seconds=round(time.perf_counter() - started, 2),
               output_dir=os.path.relpath(config.output_dir, study.output_dir))
    (Path(config.output_dir) / "upo-train.log").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return run


# What the report quotes of each run's training, from its per-step metrics: the gradient norm before clipping,
# UPO's temperature (--beta-aux auto picks one per batch) and largest weight, the value head's gradient norm.
TRAINING_FIGURES = ("grad_norm", "aux/beta_aux", "aux/weight_max", "value/grad_norm")


def training_figures(history: list[dict]) -> dict:
    """Per figure the run logged: the median, smallest and largest value over its steps."""
    figures = {}
    for name in TRAINING_FIGURES:
        values = sorted(record[name] for record in history if record.get(name) is not None)
        if values:
            middle = len(values) // 2
            median = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
            figures[name] = {"median": median, "min": values[0], "max": values[-1], "steps": len(values)}
    return figures


def measure_generations(study: Study, trainer, seed: int, timings: dict, log=None) -> dict:
    """The generation metrics of the trained policy (generated.py): its completions of the study's prompts,
    their KL estimate against the run's reference; the texts go to ``generations.jsonl`` in the run's folder."""
    from upo.train.atomic import atomic_write_text
    from upo.train.generation import reference_generator

    prompts, prompt_ids = render_prompts(study.prompt_rows, trainer.tokenizer, trainer.config)
    settings = dataclasses.replace(study.generate, seed=seed)
    metrics, records = measure_completions(trainer.module.policy, lambda: reference_generator(trainer.module),
                                           trainer.tokenizer, prompts, prompt_ids, study.scorers, settings, timings)
    log = log or (lambda message: None)
    log(f"{len(records)} completions in {timings['generate_generated']:.1f} s"
        + (f", their KL estimate in {timings['kl_generated']:.1f} s" if "kl_generated" in timings else ""))
    atomic_write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                      trainer.output_dir / "generations.jsonl")
    return {**metrics, "generated_examples": [r["completion"] for r in records[:3]]}


def reference_reward(study: Study) -> float | None:
    """The designer reward of the reference's generations (the first seed's; all of them with an SFT stage)."""
    first = next(iter(study.reference_generations.values()), None)
    return None if first is None else first["aux_reward_generated"]


def study_report(study: Study, runs: list[dict], wall_seconds: float, started: datetime.datetime) -> dict:
    held_out = study.held_out
    train_disagreeing = len(disagreeing_pairs(*study.train_aux))
    import torch

    return {
        "runs": runs,
        "dataset": {
            "path": study.dataset, "train_pairs": len(study.train_rows), "eval_pairs": len(held_out.prompts),
            "aux_reward": study.aux_reward,
            "disagreeing_train_pairs": train_disagreeing,
            "disagreeing_share_train": train_disagreeing / len(study.train_rows),
            "disagreeing_share_eval": held_out.agreeing.count(False) / len(held_out.prompts),
            "aux_reward_chosen_eval": sum(held_out.aux_chosen) / len(held_out.prompts),
            "aux_reward_rejected_eval": sum(held_out.aux_rejected) / len(held_out.prompts),
        },
        "model": study.model or "the built-in tiny model",
        "lora": study.lora,
        "sft": study.sft_report,
        "steps": study.steps,
        "seed": study.seed,
        "seeds": study.seeds,
        "upo_train_args": study.train_args,
        "user_reward": study.user_reward_specs,
        "generate": None if study.generate is None else {
            "prompts": len(study.prompt_rows), "held_out_prompts": min(len(held_out.prompts), len(study.prompt_rows)),
            "prompts_file": study.prompts_file, "samples_per_prompt": study.generate.samples,
            "max_new_tokens": study.generate.max_tokens, "temperature": study.generate.temperature,
            "greedy_prompts": min(study.generate.greedy_prompts, len(study.prompt_rows))
            if study.generate.temperature > 0 else 0,
            "aux_reward_reference": reference_reward(study),
            "reference": list(study.reference_generations.values())},
        "gates": {"trait_rate": study.trait_gate, "trait": study.trait_specs or None},
        "comparison": compare(runs, list(dict.fromkeys(spec.base for spec in study.runs)))
        if study.generate is not None and runs else None,
        "summary": summarize(runs),
        "attainable_frontier": attainable_frontier(held_out),
        "wall_seconds": round(wall_seconds, 1),
        "started": started.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
    }
