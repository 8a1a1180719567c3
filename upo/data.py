"""Preference data: load, render, tokenise, and batch (padded or packed) chosen+rejected pairs.

A preference record has a ``prompt`` and two responses, ``chosen`` and ``rejected``. Two
formats are accepted, as in TRL:

* standard: the three columns are strings;
* conversational: they are lists of ``{"role", "content"}`` messages (``prompt`` may be
  omitted, in which case the shared prefix of ``chosen`` and ``rejected`` is the prompt).
  Messages are rendered with the tokenizer's chat template, or with
  :func:`simple_chat_template` when the tokenizer has none.

A batch of ``B`` pairs always holds the ``B`` chosen sequences first and then the ``B``
rejected ones, with labels already aligned with the hidden states (position ``t`` predicts
``labels[t]``), which is what :func:`upo.fused_loss` expects.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

IGNORE_INDEX = -100
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class UserError(Exception):
    """A mistake in the user's input (flags, config, data). Reported as one line, no traceback."""


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------
class ByteTokenizer:
    """A file-free byte-level tokenizer (ByT5 style): ids 0..2 are special, bytes are offset by 3.

    ``pad = 0``, ``eos = 1``, ``bos (also unk) = 2``; byte ``b`` has id ``b + 3``. Any text
    round-trips through ``encode``/``decode`` (UTF-8).
    """

    pad_token_id = 0
    eos_token_id = 1
    bos_token_id = 2
    unk_token_id = 2
    offset = 3
    vocab_size = 256 + 3
    # No Jinja template: ``apply_chat_template`` below is the template.
    chat_template = None

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        data = bytes(i - self.offset for i in ids if i >= self.offset)
        if not skip_special_tokens:
            names = {self.pad_token_id: "<pad>", self.eos_token_id: "</s>", self.bos_token_id: "<s>"}
            parts, run = [], []
            for i in ids:
                if i >= self.offset:
                    run.append(i - self.offset)
                else:
                    parts.append(bytes(run).decode("utf-8", errors="replace"))
                    parts.append(names[i])
                    run = []
            parts.append(bytes(run).decode("utf-8", errors="replace"))
            return "".join(parts)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False, **_: Any):
        """Render messages with :func:`simple_chat_template` (and encode them if ``tokenize``)."""
        text = simple_chat_template(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text


def simple_chat_template(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """``"<|role|>\\ncontent\\n"`` per message, then ``"<|assistant|>\\n"`` if a reply is expected."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, for our tokenizer and for HF tokenizers."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_token_id(tokenizer) -> int:
    """The padding id (HF tokenizers without one pad with EOS; padded positions are masked anyway)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad is None else int(pad)


# --------------------------------------------------------------------------------------
# Loading records
# --------------------------------------------------------------------------------------
def default_dataset_path() -> Path:
    """The preference data shipped with the package (readable = chosen, convoluted = rejected)."""
    return Path(__file__).resolve().parent / "resources" / "preferences.jsonl"


def load_records(source: str | None, split: str = "train") -> list[dict]:
    """Rows of a local JSONL/JSON/Parquet file, or of a Hugging Face dataset (``datasets``, lazily).

    ``None`` loads :func:`default_dataset_path`. A name that is not an existing file is treated
    as a hub dataset only if it looks like one (``owner/name``, no file suffix).
    """
    path = Path(source).expanduser() if source else default_dataset_path()
    if path.is_file():
        return _load_local_file(path)
    if path.is_dir():
        return _load_hf_dataset(str(path), split)
    if source and _looks_like_hub_id(source):
        return _load_hf_dataset(source, split)
    raise UserError(f"dataset not found: {source or path}")


def _looks_like_hub_id(name: str) -> bool:
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and not name.lower().endswith(LOCAL_SUFFIXES))


def _load_local_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
                data = data.get("train", data.get("data", data))
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON list of records")
            return data
        if suffix == ".parquet":
            import pyarrow.parquet as pq  # lazily: only Parquet users need it

            return pq.read_table(path).to_pylist()
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    raise UserError(f"{path}: unsupported dataset file type '{suffix}' (use .jsonl, .json or .parquet)")


def _load_hf_dataset(name: str, split: str) -> list[dict]:
    """A hub dataset, a local folder of data files, or a folder written by ``save_to_disk``."""
    try:
        import datasets  # lazily: heavy import, optional dependency
    except ImportError:
        raise UserError(f"loading '{name}' needs the 'datasets' package (pip install datasets)") from None
    try:
        folder = Path(name)
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            data = datasets.load_from_disk(name)
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise UserError(f"dataset '{name}' has no split '{split}' (splits: {', '.join(data)})")
                data = data[split]
        else:
            data = datasets.load_dataset(name, split=split)
    except UserError:
        raise
    except Exception as err:  # network, missing split, bad name: all user-facing
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load dataset '{name}' (split {split}): {first_line}") from None
    return data.to_list()


# --------------------------------------------------------------------------------------
# Rendering records into prompt / response strings
# --------------------------------------------------------------------------------------
@dataclass
class RenderedPair:
    """The texts of one pair: ``*_text`` are fed to the tokenizer, ``*_plain`` to reward functions."""

    prompt_text: str
    chosen_text: str
    rejected_text: str
    prompt_plain: str
    chosen_plain: str
    rejected_plain: str


def check_columns(records: list[dict]) -> None:
    """Fail with the names of the missing columns (``prompt`` may be implicit in conversations)."""
    if not records:
        raise UserError("the dataset has no rows")
    first = records[0]
    missing = [c for c in REQUIRED_COLUMNS if c not in first]
    if missing == ["prompt"] and _is_conversation(first.get("chosen")):
        return
    if missing:
        found = ", ".join(sorted(first)) or "none"
        raise UserError(f"dataset is missing column(s) {', '.join(missing)} (found: {found})")


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value)


def render_record(record: dict, tokenizer, row: int) -> RenderedPair:
    """Turn one record (standard or conversational) into prompt/response strings."""
    for column in ("chosen", "rejected"):
        if column not in record:
            raise UserError(f"row {row}: missing column '{column}'")
    if _is_conversation(record["chosen"]):
        return _render_conversation(record, tokenizer, row)
    if "prompt" not in record:
        raise UserError(f"row {row}: missing column 'prompt'")
    values = [record["prompt"], record["chosen"], record["rejected"]]
    for name, value in zip(REQUIRED_COLUMNS, values):
        if not isinstance(value, str):
            raise UserError(f"row {row}: column '{name}' must be a string or a list of messages, "
                            f"got {type(value).__name__}")
    return RenderedPair(*values, *values)


def _render_conversation(record: dict, tokenizer, row: int) -> RenderedPair:
    chosen, rejected = record["chosen"], record["rejected"]
    if not _is_conversation(rejected):
        raise UserError(f"row {row}: 'chosen' is a list of messages but 'rejected' is not")
    prompt = record.get("prompt")
    if prompt is None:  # implicit prompt: the shared prefix of the two conversations
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not _is_conversation(prompt):
        raise UserError(f"row {row}: 'prompt' must be a string or a list of messages")

    prompt_text = _chat(tokenizer, prompt, add_generation_prompt=True)

    def response(messages: list[dict]) -> str:
        # As TRL: render prompt+response and keep what follows the rendered prompt.
        full = _chat(tokenizer, list(prompt) + list(messages), add_generation_prompt=False)
        if full.startswith(prompt_text):
            return full[len(prompt_text):]
        return "".join(str(m["content"]) for m in messages)

    plain_prompt = "\n".join(str(m["content"]) for m in prompt)
    return RenderedPair(
        prompt_text, response(chosen), response(rejected), plain_prompt,
        "\n".join(str(m["content"]) for m in chosen), "\n".join(str(m["content"]) for m in rejected),
    )


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if isinstance(tokenizer, ByteTokenizer) or not getattr(tokenizer, "chat_template", None):
        return simple_chat_template(messages, add_generation_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


# --------------------------------------------------------------------------------------
# Tokenising
# --------------------------------------------------------------------------------------
@dataclass
class PreferenceExample:
    """One tokenised pair. Responses end with EOS; ``aux_*`` hold one score per auxiliary reward."""

    index: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    aux_chosen: list[float] = field(default_factory=list)
    aux_rejected: list[float] = field(default_factory=list)
    prompt_truncated: bool = False
    response_truncated: bool = False


@dataclass
class TokenizeSettings:
    max_length: int = 512
    max_prompt_length: int | None = None  # None: half of max_length
    truncation: str = "keep_end"  # which end of an over-long prompt to keep

    def prompt_budget(self) -> int:
        budget = self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2
        return max(1, min(budget, self.max_length - 1))  # leave room for at least one response token


def tokenize_pair(rendered: RenderedPair, tokenizer, settings: TokenizeSettings, index: int) -> PreferenceExample:
    """Tokenise a rendered pair: BOS + prompt (truncated per ``settings``) and responses + EOS.

    Empty responses are an error (nothing to learn from); over-long responses are cut at the end.
    """
    for column, text in (("chosen", rendered.chosen_text), ("rejected", rendered.rejected_text)):
        if not text.strip():
            raise UserError(f"row {index}: '{column}' response is empty")
    prompt = encode_text(tokenizer, rendered.prompt_text)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not prompt or prompt[0] != bos):
        prompt = [bos] + prompt  # also gives an empty prompt a token for the value head
    budget = settings.prompt_budget()
    prompt_truncated = len(prompt) > budget
    if prompt_truncated:
        prompt = prompt[-budget:] if settings.truncation == "keep_end" else prompt[:budget]

    eos = getattr(tokenizer, "eos_token_id", None)
    room = settings.max_length - len(prompt)
    responses, response_truncated = [], False
    for text in (rendered.chosen_text, rendered.rejected_text):
        ids = encode_text(tokenizer, text) + ([eos] if eos is not None else [])
        response_truncated |= len(ids) > room
        responses.append(ids[:room])
    return PreferenceExample(index, prompt, responses[0], responses[1],
                             prompt_truncated=prompt_truncated, response_truncated=response_truncated)


@dataclass
class PreferenceData:
    """Tokenised pairs plus what tokenisation had to do to them."""

    examples: list[PreferenceExample]
    reward_names: list[str] = field(default_factory=list)
    truncated_prompts: int = 0
    truncated_responses: int = 0
    plain_texts: list[RenderedPair] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)


def build_preference_data(records: list[dict], tokenizer, settings: TokenizeSettings,
                          reward=None, max_examples: int | None = None,
                          reward_batch_size: int = 256) -> PreferenceData:
    """Render, tokenise and (with ``reward``, a ``CombinedReward``) score every record once.

    Rewards are deterministic functions of the texts, so they are computed here, not per step.
    """
    if max_examples is not None:
        records = records[:max_examples]
    check_columns(records)
    rendered = [render_record(r, tokenizer, i) for i, r in enumerate(records)]
    examples = [tokenize_pair(p, tokenizer, settings, i) for i, p in enumerate(rendered)]
    names: list[str] = []
    if reward is not None:
        names = list(reward.names)
        for start in range(0, len(records), reward_batch_size):
            stop = min(start + reward_batch_size, len(records))
            _score_slice(reward, records[start:stop], rendered[start:stop], examples[start:stop])
    return PreferenceData(
        examples, names,
        truncated_prompts=sum(e.prompt_truncated for e in examples),
        truncated_responses=sum(e.response_truncated for e in examples),
        plain_texts=rendered,
    )


def _score_slice(reward, rows: list[dict], rendered: list[RenderedPair], examples: list[PreferenceExample]):
    prompts = [p.prompt_plain for p in rendered]
    try:
        chosen, rejected = reward.score_pairs(prompts, [p.chosen_plain for p in rendered],
                                              [p.rejected_plain for p in rendered], rows)
    except ValueError as err:  # e.g. a column reward naming a column the data lacks
        first = examples[0].index
        raise UserError(f"auxiliary reward on rows {first}..{first + len(rows) - 1}: {err}") from None
    for example, c, r in zip(examples, chosen.tolist(), rejected.tolist()):
        example.aux_chosen, example.aux_rejected = c, r


def split_train_eval(num_examples: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of example indices; at least one pair stays in training."""
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    num_eval = min(int(math.floor(num_examples * eval_fraction)), num_examples - 1)
    return sorted(order[num_eval:]), sorted(order[:num_eval])


# --------------------------------------------------------------------------------------
# Sampling: a seeded permutation per epoch, sharded across ranks
# --------------------------------------------------------------------------------------
@dataclass
class DataPosition:
    """Where training is in the data: the epoch and the number of its permuted pairs consumed."""

    epoch: int = 0
    index: int = 0


class PairSampler:
    """Global batches from a per-epoch seeded permutation; each rank takes its contiguous share.

    The permutation depends only on ``(seed, epoch)``, so a saved :class:`DataPosition` resumes
    the exact sequence of batches. Incomplete batches at the end of an epoch are dropped so that
    every rank always sees the same number of pairs.
    """

    def __init__(self, indices: Sequence[int], global_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if global_batch_size % world_size:
            raise UserError(f"--batch-size {global_batch_size} must be divisible by the number of "
                            f"processes ({world_size})")
        if len(indices) < global_batch_size:
            raise UserError(f"--batch-size {global_batch_size} is larger than the {len(indices)} "
                            "training pairs")
        self.indices = list(indices)
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self._cached_epoch, self._cached_order = -1, []

    @property
    def batches_per_epoch(self) -> int:
        return len(self.indices) // self.global_batch_size

    def order(self, epoch: int) -> list[int]:
        if epoch != self._cached_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.indices), generator=gen).tolist()
            self._cached_epoch, self._cached_order = epoch, [self.indices[i] for i in perm]
        return self._cached_order

    def next_batch(self, position: DataPosition) -> tuple[list[int], DataPosition]:
        """This rank's example indices for the next global batch, and the position after it."""
        epoch, index = position.epoch, position.index
        if index + self.global_batch_size > len(self.indices):
            epoch, index = epoch + 1, 0
        batch = self.order(epoch)[index:index + self.global_batch_size]
        share = self.global_batch_size // self.world_size
        mine = batch[self.rank * share:(self.rank + 1) * share]
        return mine, DataPosition(epoch, index + self.global_batch_size)


# --------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------
@dataclass
class PreferenceBatch:
    """Model inputs for ``B`` pairs: rows (or packed sequences) ``0..B-1`` chosen, ``B..2B-1`` rejected.

    Padded: ``input_ids``/``attention_mask``/``labels`` are ``[2B, T]``. Packed: ``input_ids`` and
    ``position_ids`` are ``[1, N]``, ``labels`` is ``[N]`` and ``cu_seqlens`` is int32 ``[2B+1]``.
    ``prompt_last_index`` locates each pair's last prompt token in the chosen sequence
    (``[B]`` row positions when padded, flat positions when packed).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    prompt_last_index: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    aux_chosen: torch.Tensor | None = None  # [B, K]
    aux_rejected: torch.Tensor | None = None
    ref_chosen_logps: torch.Tensor | None = None  # [B], when precomputed
    ref_rejected_logps: torch.Tensor | None = None
    example_indices: list[int] = field(default_factory=list)
    num_tokens: int = 0

    @property
    def num_pairs(self) -> int:
        return len(self.example_indices)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def to(self, device) -> "PreferenceBatch":
        moved = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
                 for name, value in self.__dict__.items()}
        return PreferenceBatch(**moved)


def _sequences(examples: Sequence[PreferenceExample]) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) for all chosen sequences, then all rejected ones."""
    chosen = [(e.prompt_ids + e.chosen_ids, len(e.prompt_ids)) for e in examples]
    rejected = [(e.prompt_ids + e.rejected_ids, len(e.prompt_ids)) for e in examples]
    return chosen + rejected


def _shifted_labels(ids: list[int], prompt_len: int) -> list[int]:
    """Position ``t`` predicts ``ids[t+1]`` for response tokens; prompt and last position ignored."""
    return [IGNORE_INDEX] * (prompt_len - 1) + ids[prompt_len:] + [IGNORE_INDEX]


def _aux_and_ref(examples, ref_logps) -> dict:
    extra: dict[str, Any] = {}
    if examples and examples[0].aux_chosen:
        extra["aux_chosen"] = torch.tensor([e.aux_chosen for e in examples], dtype=torch.float32)
        extra["aux_rejected"] = torch.tensor([e.aux_rejected for e in examples], dtype=torch.float32)
    if ref_logps is not None:
        idx = torch.tensor([e.index for e in examples], dtype=torch.long)
        extra["ref_chosen_logps"] = ref_logps["chosen"][idx].float()
        extra["ref_rejected_logps"] = ref_logps["rejected"][idx].float()
    return extra


def collate_padded(examples: Sequence[PreferenceExample], pad_id: int, ref_logps: dict | None = None,
                   pad_to_multiple_of: int = 1) -> PreferenceBatch:
    """Right-padded ``[2B, T]`` batch (right padding keeps real tokens at the same positions)."""
    seqs = _sequences(examples)
    width = max(len(ids) for ids, _ in seqs)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(seqs):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, :len(ids)] = torch.tensor(_shifted_labels(ids, prompt_len))
    prompt_last = torch.tensor([len(e.prompt_ids) - 1 for e in examples], dtype=torch.long)
    return PreferenceBatch(
        input_ids=input_ids, labels=labels, prompt_last_index=prompt_last, attention_mask=attention_mask,
        example_indices=[e.index for e in examples], num_tokens=int(attention_mask.sum()),
        **_aux_and_ref(examples, ref_logps),
    )


def collate_packed(examples: Sequence[PreferenceExample], ref_logps: dict | None = None) -> PreferenceBatch:
    """Padding-free batch: all ``2B`` sequences concatenated in one row, positions reset per sequence.

    Transformers turns the restarting ``position_ids`` (with no attention mask) into a
    block-diagonal causal mask for SDPA/eager and into varlen calls for flash-attention.
    """
    seqs = _sequences(examples)
    ids_flat, labels_flat, positions, bounds = [], [], [], [0]
    for ids, prompt_len in seqs:
        ids_flat += ids
        labels_flat += _shifted_labels(ids, prompt_len)
        positions += range(len(ids))
        bounds.append(bounds[-1] + len(ids))
    prompt_last = torch.tensor([bounds[b] + len(e.prompt_ids) - 1 for b, e in enumerate(examples)],
                               dtype=torch.long)
    return PreferenceBatch(
        input_ids=torch.tensor([ids_flat], dtype=torch.long),
        labels=torch.tensor(labels_flat, dtype=torch.long),
        prompt_last_index=prompt_last,
        position_ids=torch.tensor([positions], dtype=torch.long),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        example_indices=[e.index for e in examples], num_tokens=len(ids_flat),
        **_aux_and_ref(examples, ref_logps),
    )


def collate(examples: Sequence[PreferenceExample], pad_id: int, packing: bool,
            ref_logps: dict | None = None) -> PreferenceBatch:
    return collate_packed(examples, ref_logps) if packing else collate_padded(examples, pad_id, ref_logps)
