"""A tiny, offline TRL set-up for the UPOTrainer tests: a word-level tokenizer built in code, a 2-layer
Llama from a config, an in-memory preference dataset, and CPU-safe trainer arguments.

Importing this module sets the offline environment variables, so import it before TRL.
"""
from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass

for _name, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                      "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
                      "WANDB_DISABLED": "true"}.items():
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
WORDS = [f"w{i}" for i in range(61)]  # 64 tokens in all


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # eos as a special token: TRL appends the eos *string* to each completion
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_model(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def make_rows(n: int = 8, seed: int = 0) -> dict[str, list]:
    rng = random.Random(seed)

    def words(low, high):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    # completions start with a space: tokenize(prompt) is then a prefix of tokenize(prompt + completion)
    return {"prompt": [words(3, 6) for _ in range(n)], "chosen": [" " + words(2, 6) for _ in range(n)],
            "rejected": [" " + words(2, 6) for _ in range(n)], "topic": [f"t{i % 3}" for i in range(n)]}


def make_dataset(n: int = 8, seed: int = 0):
    from datasets import Dataset

    return Dataset.from_dict(make_rows(n, seed))


def trainer_args(**overrides) -> dict:
    """Config fields for a short, deterministic, offline CPU run."""
    settings = dict(output_dir="/tmp/upo-trl-tests", max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                    logging_steps=1, report_to="none", save_strategy="no", bf16=False, gradient_checkpointing=False,
                    use_cpu=True, dataloader_num_workers=0, seed=0, max_length=64, disable_tqdm=True)
    settings.update(overrides)
    return settings


@dataclass
class Run:
    trainer: object
    logs: list[dict]  # the per-step log entries (those with a "loss")
    updates: dict[str, torch.Tensor]  # trained parameter - initial parameter, by name


def run(trainer_cls, config_cls, *, train: bool = True, ref_model: bool = True, ref_seed: int | None = None,
        dataset=None, peft_config=None, trainer_kwargs=None, **overrides) -> Run:
    """Build the tiny model (seed 0), a trainer of ``trainer_cls`` and train it for ``max_steps``. The
    reference is a copy of the model, or with ``ref_seed`` another initialisation (log-ratios of O(1)
    from the first step, where a copy's are 0)."""
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    kwargs = dict(trainer_kwargs or {})
    if ref_model:
        kwargs["ref_model"] = copy.deepcopy(model) if ref_seed is None else make_model(tokenizer, seed=ref_seed)
    trainer = trainer_cls(model=model, args=config_cls(**trainer_args(**overrides)),
                          train_dataset=make_dataset() if dataset is None else dataset, processing_class=tokenizer,
                          peft_config=peft_config, **kwargs)
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    if train:
        trainer.train()
    named = dict(trainer.model.named_parameters())
    updates = {name: named[name].detach() - before for name, before in initial.items()}
    return Run(trainer, [h for h in trainer.state.log_history if "loss" in h], updates)


def update_ratio(a: Run, b: Run) -> float:
    """||update_a - update_b|| / ||update_a|| over the parameters ``a`` trained (``b`` may train more)."""
    diff = sum(float(((a.updates[n] - b.updates[n]) ** 2).sum()) for n in a.updates)
    norm = sum(float((a.updates[n] ** 2).sum()) for n in a.updates)
    return (diff / norm) ** 0.5
