"""One frontier study: split and score the data once, train the SFT stage once (sft.py), then every run of
the grid for every seed in turn, and measure each.

Runs are ``upo-train`` runs driven in-process (:class:`upo.train.trainer.Trainer`), one after the
other, each in ``<output-dir>/runs/<name>-seed<k>/``. Their settings are the user's ``upo-train`` flags
(passed through unchanged, so a new ``upo-train`` flag needs no code here) plus what the frontier
fixes per run: the model (the SFT stage's, with LoRA for a pretrained model), the loss, UPO's lambda,
the data, the steps and the seed.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from upo.frontier.generated import generate, kl_estimate
from upo.frontier.grid import RunSpec, disagreeing_pairs, relabel, write_rows
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
    reference_generations: dict = field(default_factory=dict)  # seed (0 with an SFT stage) -> summary

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


def prepare_study(args, reward, runs: list[RunSpec], train_settings: dict, train_args: list[str],
                  user_reward=None) -> Study:
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
        generate = GenerateSettings(args.generate, args.generate_max_tokens, args.generate_temperature, args.seed)
    study = Study(output_dir, dataset_label(args.dataset), list(args.aux_reward), reward, args.steps, args.seed,
                  train_rows, tuple(train_aux), write_rows(eval_rows, output_dir / "data" / "eval.jsonl"),
                  HeldOut(eval_prompts, eval_c, eval_r), runs, train_settings, generate, args.overwrite, train_args,
                  model=args.model, seeds=[args.seed + k for k in range(args.seeds)],
                  sft=SftSettings(args.sft_steps, args.sft_lr) if args.sft_steps else None,
                  user_reward_specs=list(args.user_reward), user_reward=user_reward)
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
               swapped_pairs=swapped if spec.method == "relabel" else None,
               eval_rewards_accuracies=summary["eval"].get("rewards/accuracies"),
               train_loss=summary["train"].get("loss"), train_seconds=round(summary["train_seconds"], 2),
               wall_seconds=round(time.perf_counter() - started, 2),
               output_dir=os.path.relpath(config.output_dir, study.output_dir))
    (Path(config.output_dir) / "upo-train.log").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return run


def measure_generations(study: Study, trainer, seed: int, timings: dict, log=None) -> dict:
    """The generation metrics of the trained policy (generated.py) and, once per reference, the reference's;
    the texts go to ``generations.jsonl`` in the run's folder."""
    from upo.train.atomic import atomic_write_text
    from upo.train.generation import reference_generator

    indices = trainer.eval_indices[:study.generate.prompts]
    prompt_ids = [trainer.data.examples[i].prompt_ids for i in indices]
    prompts = study.held_out.prompts[:len(indices)]
    settings = GenerateSettings(study.generate.prompts, study.generate.max_tokens, study.generate.temperature, seed,
                                study.generate.batch_size)
    policy = trainer.module.policy
    clock = time.perf_counter()
    generations = generate(policy, trainer.tokenizer, prompt_ids, prompts, study.reward, study.user_reward, settings)
    timings["generate"] = time.perf_counter() - clock
    log = log or (lambda message: None)
    log(f"generated {len(prompts)} completions in {timings['generate']:.1f} s")
    kl = kl_estimate(policy, reference_generator(trainer.module), prompt_ids, generations)
    timings["kl"] = time.perf_counter() - clock - timings["generate"]
    log(f"KL estimate in {timings['kl']:.1f} s")
    metrics = {**generations.summary(), "kl_generated": kl, "generated_examples": generations.texts[:3]}
    key = 0 if study.sft is not None else seed  # with an SFT stage every run of every seed has the same reference
    reference = reference_generator(trainer.module)  # None with --precompute-ref: no reference model held
    if key not in study.reference_generations and reference is not None:
        clock = time.perf_counter()
        with reference as model:
            reference_generations = generate(model, trainer.tokenizer, prompt_ids, prompts, study.reward,
                                             study.user_reward, settings)
        study.reference_generations[key] = {"seed": seed, **reference_generations.summary(),
                                            "generated_examples": reference_generations.texts[:3]}
        timings["reference_generate"] = time.perf_counter() - clock
    records = [json.dumps({"prompt": prompt, "completion": text, "aux_reward": aux, "user_reward": user},
                          ensure_ascii=False) + "\n"
               for prompt, text, aux, user in zip(prompts, generations.texts, generations.aux_reward,
                                                  generations.user_reward)]
    atomic_write_text("".join(records), trainer.output_dir / "generations.jsonl")
    return metrics


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
            "prompts": study.generate.prompts, "max_new_tokens": study.generate.max_tokens,
            "temperature": study.generate.temperature,
            "aux_reward_reference": reference_reward(study),
            "reference": list(study.reference_generations.values())},
        "summary": summarize(runs),
        "attainable_frontier": attainable_frontier(held_out),
        "wall_seconds": round(wall_seconds, 1),
        "started": started.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
    }
