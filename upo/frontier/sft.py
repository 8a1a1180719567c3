"""The frontier's shared SFT stage: the model fine-tuned once on the training responses, the start and the
reference of every run of the grid (as preference training is done in practice).

It is one ``upo-train`` run with ``--loss-type sft`` (TRL's: the token-mean NLL of the chosen response) on
the training split with every pair given both ways, so that the model learns *both* responses of each
training prompt (direct and hedged, plain and technical), not the user's side only: the reference then
writes both traits, and the grid measures where each method moves it. A pretrained model trains LoRA
adapters (on the shared 2-core CPU, full fine-tuning of SmolLM2 ran at 28 to 37 tokens/s where a LoRA
step of DPO + UPO ran at 206 to 210 in the same probe), merged into
the weights afterwards and saved as a plain model in ``sft/merged/``; the built-in tiny model trains
whole, its ``sft/model/``. That folder is every grid run's ``--model``. It is trained once per study,
before the first run, with the first seed, and reused by every run of every seed (the spread over seeds
is the preference stage's, not the SFT stage's).
"""
from __future__ import annotations

import time
from pathlib import Path

from upo.frontier.grid import write_rows
from upo.train.config import KTO_SETTINGS, UPO_SETTINGS, TrainConfig, build_config
from upo.train.signals import stop_if_signalled

SFT_DIR = "sft"
MERGED_DIR = "merged"  # the SFT stage's LoRA adapters merged into the weights: a plain model folder
# The preference stage's settings that the SFT stage sets itself or that do not apply to its loss.
NOT_FOR_SFT = (*UPO_SETTINGS, *KTO_SETTINGS, "lora", "lr")


def both_ways(rows: list[dict]) -> list[dict]:
    """Each pair as given and swapped: the ``sft`` loss reads the chosen side, so every response is a target."""
    swapped = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in rows]
    return [row for pair in zip(rows, swapped) for row in pair]


def sft_config(study, dataset: str) -> TrainConfig:
    """The SFT stage's ``upo-train`` settings: the passed-through flags that apply, then the frontier's."""
    settings = {"eval_every": study.sft.steps, "save_every": study.sft.steps, "keep_checkpoints": 1,
                **{k: v for k, v in study.train_settings.items() if k not in NOT_FOR_SFT}}
    settings.update(dataset=dataset, eval_dataset=study.eval_path, loss_type=["sft"], max_steps=study.sft.steps,
                    seed=study.seeds[0], lr=study.sft.lr, model=study.model, lora=study.lora,
                    output_dir=str(study.output_dir / SFT_DIR), overwrite=study.overwrite, progress=False)
    return build_config({}, settings)


def sft_model_dir(study) -> Path:
    """The SFT stage's model as a plain folder: ``sft/merged`` (LoRA merged) or ``sft/model`` (trained whole)."""
    return study.output_dir / SFT_DIR / (MERGED_DIR if study.lora else "model")


def save_merged(policy, tokenizer, target: Path) -> None:
    """The LoRA policy with its adapters merged into the weights, saved as a plain model with its tokenizer."""
    from upo.train.final_model import save_tokenizer

    merged = policy.merge_and_unload()
    merged.save_pretrained(target)
    save_tokenizer(tokenizer, target)


def run_sft(study, runtime) -> dict:
    """Train the SFT stage; returns what ``frontier.json`` says of it."""
    from upo.train.trainer import Trainer

    started = time.perf_counter()
    rows = both_ways(study.train_rows)
    dataset = write_rows(rows, study.output_dir / "data" / "sft.jsonl")
    config = sft_config(study, dataset)
    lines: list[str] = []
    trainer = Trainer(config, runtime, log=lines.append)
    summary = trainer.train()
    stop_if_signalled(trainer)
    if study.lora:
        save_merged(trainer.module.policy, trainer.tokenizer, sft_model_dir(study))
    (Path(config.output_dir) / "upo-train.log").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return {"steps": study.sft.steps, "passes": study.sft.passes, "lr": config.learning_rate, "seed": config.seed,
            "examples": len(rows),
            "model": str(sft_model_dir(study).relative_to(study.output_dir)),
            "train_loss": summary["train"].get("loss"), "eval_loss": summary["eval"].get("loss"),
            "train_seconds": round(summary["train_seconds"], 2),
            "wall_seconds": round(time.perf_counter() - started, 2)}
