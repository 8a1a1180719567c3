"""Preference data for ``upo-train``: load rows, render and tokenise pairs, order them, batch them.

    records.py    rows of a JSONL/JSON/Parquet file or a ``datasets`` dataset
    tokenizer.py  the built-in byte tokenizer; token helpers for any tokenizer
    dataset.py    the rows' format (pairs or unpaired rows) -> PreferenceData, each row tokenised and scored once
    pairs.py      rows -> rendered text -> tokenised, truncated, reward-scored pairs; train/eval split
    unpaired.py   the same for unpaired rows (prompt/completion/label, KTO's format)
    sampler.py    the seeded, resumable, rank-sharded order of the pairs
    collate.py    padded or packed batches: B chosen sequences, then B rejected ones, or N unpaired rows;
                  KTO's mismatched rows
"""
from upo.train.data.collate import (
    IGNORE_INDEX,
    PreferenceBatch,
    SequenceRows,
    UnpairedBatch,
    collate,
    collate_packed,
    collate_padded,
    kl_keys,
    rows_of,
)
from upo.train.data.dataset import PreferenceData, build_preference_data, check_columns
from upo.train.data.pairs import (
    REQUIRED_COLUMNS,
    PreferenceExample,
    RenderedPair,
    TokenizeSettings,
    render_record,
    split_train_eval,
    tokenize_pair,
)
from upo.train.data.records import LOCAL_SUFFIXES, Records, default_dataset_path, load_records, load_split_if_present
from upo.train.data.sampler import DataPosition, PairSampler, eval_chunks
from upo.train.data.unpaired import UnpairedExample
from upo.train.data.tokenizer import ByteTokenizer, encode_text, has_chat_template, pad_token_id, simple_chat_template
from upo.train.errors import UserError

__all__ = [
    "IGNORE_INDEX", "LOCAL_SUFFIXES", "REQUIRED_COLUMNS", "ByteTokenizer", "DataPosition", "PairSampler",
    "PreferenceBatch", "PreferenceData", "PreferenceExample", "Records", "RenderedPair", "SequenceRows",
    "TokenizeSettings", "UnpairedBatch", "UnpairedExample", "UserError", "kl_keys", "load_split_if_present", "rows_of",
    "build_preference_data", "check_columns", "collate", "collate_packed", "collate_padded",
    "default_dataset_path", "encode_text", "eval_chunks", "has_chat_template", "load_records", "pad_token_id",
    "render_record", "simple_chat_template", "split_train_eval", "tokenize_pair",
]
