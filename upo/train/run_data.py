"""Which pairs a run trains and evaluates on: load ``--dataset`` (and ``--eval-dataset`` or its eval split),
hold pairs out, bound the evaluation, and say what truncation did."""
from __future__ import annotations

from dataclasses import dataclass

from upo.train.config import TrainConfig
from upo.train.data import (PreferenceData, TokenizeSettings, build_preference_data, check_columns,
                            has_chat_template, load_records, load_split_if_present, split_train_eval)
from upo.train.errors import UserError


@dataclass
class RunData:
    data: PreferenceData
    train_indices: list[int]
    eval_indices: list[int]


def load_run_data(config: TrainConfig, tokenizer, reward, log, check_format=None) -> RunData:
    """The tokenised pairs (or unpaired rows) and the train/eval indices into them.

    Held-out pairs come from ``--eval-dataset``, else from the dataset's ``--eval-split`` when it
    has one (then every ``--dataset`` pair trains), else ``--eval-fraction`` of ``--dataset``;
    ``--eval-max-pairs`` keeps the first N of them. ``check_format(unpaired)`` is called once the
    rows' format is known, before any is tokenised.
    """
    c = config
    # the shipped default as chat messages for a model with a chat template (an instruct model), as strings else
    records = load_records(c.dataset, c.dataset_split, has_chat_template(tokenizer)).head(c.max_examples)
    if c.eval_dataset is not None:
        held_out = load_records(c.eval_dataset, c.eval_split)
    elif c.eval_split != c.dataset_split:
        held_out = load_split_if_present(c.dataset, c.eval_split)
    else:
        held_out = None
    unpaired = check_columns(records)
    if held_out and check_columns(held_out) != unpaired:
        kinds = ("unpaired (prompt/completion/label)", "paired (prompt/chosen/rejected)")
        raise UserError(f"the held-out rows are {kinds[not check_columns(held_out)]} but the training rows are "
                        f"{kinds[not unpaired]}: give both in one format")
    if check_format is not None:
        check_format(unpaired)
    num_train = len(records)
    if held_out is not None:
        records = records + held_out.head(c.eval_max_pairs)
    settings = TokenizeSettings(c.max_length, c.max_prompt_length, c.truncation, c.max_completion_length)
    data = build_preference_data(records, tokenizer, settings, reward=reward)
    if held_out is None:
        train_indices, eval_indices = split_train_eval(len(data), c.eval_fraction, c.seed)
    else:
        train_indices, eval_indices = list(range(num_train)), list(range(num_train, len(data)))
    if c.eval_max_pairs is not None:
        eval_indices = eval_indices[:c.eval_max_pairs]
    report_truncation(data, c, log)
    return RunData(data, train_indices, eval_indices)


def report_truncation(data: PreferenceData, config: TrainConfig, log) -> None:
    """One line when truncation cut prompts or responses (a run cut to pieces should not be a surprise)."""
    if not (data.truncated_prompts or data.truncated_responses):
        return
    prompt_budget = TokenizeSettings(config.max_length, config.max_prompt_length).prompt_budget()
    response_limit = f"--max-length {config.max_length}" + (
        f", --max-completion-length {config.max_completion_length}" if config.max_completion_length else "")
    every = " (all of them: no response keeps its end, raise the limit)" if (
        data.truncated_responses == len(data)) else ""
    log(f"note: truncated {data.truncated_prompts} of {len(data)} prompts to {prompt_budget} tokens "
        f"(--max-prompt-length) and the responses of {data.truncated_responses} of {len(data)} pairs "
        f"({response_limit}){every}")
