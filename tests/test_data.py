"""upo.train.data: byte tokenizer, record formats, tokenisation/truncation, padded vs packed batches, sampler."""
import json

import pytest
import torch

from upo.train.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    DataPosition,
    PairSampler,
    TokenizeSettings,
    UserError,
    build_preference_data,
    check_columns,
    collate_packed,
    collate_padded,
    default_dataset_path,
    load_records,
    render_record,
    simple_chat_template,
    split_train_eval,
    tokenize_pair,
)
from upo.rewards import CombinedReward

TOK = ByteTokenizer()
CHAT_SAMPLE = default_dataset_path().with_name("preferences_chat_sample.jsonl")


def _examples(n=4, max_length=64, **settings):
    records = [{"prompt": f"Question {i}?" * (i + 1), "chosen": "Yes." * (i + 1), "rejected": "No, never."}
               for i in range(n)]
    return build_preference_data(records, TOK, TokenizeSettings(max_length, **settings)).examples


# ------------------------------------------------------------------ tokenizer
def test_byte_tokenizer_round_trips_unicode_and_reserves_special_ids():
    text = "Héllo, wörld! ✓"
    ids = TOK.encode(text)
    assert min(ids) >= 3 and max(ids) < TOK.vocab_size == 259
    assert TOK.decode(ids) == text
    assert TOK.encode("a", add_special_tokens=True) == [TOK.bos_token_id, ord("a") + 3]
    assert TOK.decode([TOK.bos_token_id, ord("a") + 3, TOK.eos_token_id]) == "a"
    assert TOK.decode([ord("a") + 3, TOK.eos_token_id], skip_special_tokens=False) == "a</s>"


def test_simple_chat_template():
    messages = [{"role": "user", "content": "Hi"}]
    assert simple_chat_template(messages) == "<|user|>\nHi\n"
    assert TOK.apply_chat_template(messages, add_generation_prompt=True) == "<|user|>\nHi\n<|assistant|>\n"


# ------------------------------------------------------------------ records
def test_shipped_datasets_load_and_render():
    standard = load_records(None)
    assert len(standard) >= 300 and {"prompt", "chosen", "rejected"} <= set(standard[0])
    chat = load_records(str(CHAT_SAMPLE))
    pair = render_record(chat[0], TOK, 0)
    assert pair.prompt_text.endswith("<|assistant|>\n")
    assert pair.chosen_text == chat[0]["chosen"][0]["content"] + "\n"
    assert pair.chosen_plain == chat[0]["chosen"][0]["content"]


def test_the_default_data_comes_as_chat_messages_for_a_model_with_a_chat_template():
    from upo.train.data import has_chat_template
    from upo.train.data.tokenizer import hf_byte_tokenizer

    templated = hf_byte_tokenizer()  # the byte tokenizer's saved form: it carries a Jinja chat template
    assert has_chat_template(templated) and not has_chat_template(TOK)
    strings, messages = load_records(None), load_records(None, conversational_default=True)
    assert [row["prompt"] for row in strings] == [row["prompt"][0]["content"] for row in messages]
    assert load_records(str(CHAT_SAMPLE), conversational_default=True) == load_records(str(CHAT_SAMPLE))


def test_a_chat_templates_own_end_of_turn_replaces_the_appended_eos():
    """As TRL: a response rendered by the tokenizer's chat template ends where the template ends the turn (no EOS
    added); strings, and messages rendered by the built-in template, end with EOS."""
    from upo.train.data.tokenizer import hf_byte_tokenizer

    templated = hf_byte_tokenizer()
    templated.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[end]{% endfor %}"
                               "{% if add_generation_prompt %}[assistant]{% endif %}")
    row = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Yes."}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    pair = tokenize_pair(render_record(row, templated, 0), templated, TokenizeSettings(64), 0)
    assert templated.decode(pair.prompt_ids, skip_special_tokens=False) == "<s>[user]Hi?[end][assistant]"
    assert templated.decode(pair.chosen_ids, skip_special_tokens=False) == "Yes.[end]"
    assert templated.decode(pair.rejected_ids, skip_special_tokens=False) == "No.[end]"
    for tokenizer, data in ((templated, {"prompt": "Hi?", "chosen": "Yes.", "rejected": "No."}), (TOK, row)):
        pair = tokenize_pair(render_record(data, tokenizer, 0), tokenizer, TokenizeSettings(64), 0)
        assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tokenizer.eos_token_id


def test_implicit_prompt_conversation_uses_shared_prefix():
    user = {"role": "user", "content": "Q"}
    record = {"chosen": [user, {"role": "assistant", "content": "good"}],
              "rejected": [user, {"role": "assistant", "content": "bad"}]}
    check_columns([record])
    pair = render_record(record, TOK, 0)
    assert pair.prompt_text == "<|user|>\nQ\n<|assistant|>\n"
    assert (pair.chosen_text, pair.rejected_text) == ("good\n", "bad\n")


def test_missing_columns_are_named():
    with pytest.raises(UserError, match="missing column.*chosen, rejected.*found: answer, prompt"):
        check_columns([{"prompt": "p", "answer": "a"}])


def test_empty_response_is_an_error_naming_the_row():
    records = [{"prompt": "p", "chosen": "ok", "rejected": "ok"}, {"prompt": "p", "chosen": "  ", "rejected": "x"}]
    with pytest.raises(UserError, match="row 1: 'chosen' response is empty"):
        build_preference_data(records, TOK, TokenizeSettings(32))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_local_file_formats(tmp_path, suffix):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 3
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_records(str(path)) == rows


def test_missing_local_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="dataset not found"):
        load_records(str(tmp_path / "nope.jsonl"))


# ------------------------------------------------------------------ tokenisation
def test_tokenize_adds_bos_and_eos_and_truncates_prompts_per_mode():
    from upo.train.data import RenderedPair

    pair = RenderedPair("abcdefghij", "xy", "z", "abcdefghij", "xy", "z")
    full = tokenize_pair(pair, TOK, TokenizeSettings(max_length=64), 0)
    assert full.prompt_ids == [TOK.bos_token_id] + TOK.encode("abcdefghij")
    assert full.chosen_ids == TOK.encode("xy") + [TOK.eos_token_id]
    assert not full.prompt_truncated

    keep_end = tokenize_pair(pair, TOK, TokenizeSettings(max_length=10, max_prompt_length=4), 0)
    assert keep_end.prompt_truncated and keep_end.prompt_ids == TOK.encode("ghij")
    keep_start = tokenize_pair(pair, TOK, TokenizeSettings(10, 4, "keep_start"), 0)
    assert keep_start.prompt_ids == full.prompt_ids[:4]
    # Responses are cut to what max_length leaves after the prompt.
    short = tokenize_pair(pair, TOK, TokenizeSettings(max_length=6, max_prompt_length=5), 0)
    assert len(short.prompt_ids) + len(short.chosen_ids) == 6 and short.response_truncated


def test_truncated_prompts_are_counted():
    data = build_preference_data(
        [{"prompt": "x" * n, "chosen": "c", "rejected": "r"} for n in (3, 30, 40)], TOK, TokenizeSettings(32))
    assert data.truncated_prompts == 2  # budget: half of max_length = 16 tokens


def test_rewards_are_scored_once_per_response_with_columns():
    records = [{"prompt": "p", "chosen": "Short and clear.", "rejected": "Notwithstanding considerations.",
                "score_chosen": 1.0, "score_rejected": -1.0}]
    reward = CombinedReward.from_specs(["readability:1.0", "column:score:0.5"])
    data = build_preference_data(records, TOK, TokenizeSettings(64), reward=reward)
    example = data.examples[0]
    assert data.reward_names == ["readability", "column:score"]
    assert example.aux_chosen[1] == 1.0 and example.aux_rejected[1] == -1.0
    assert example.aux_chosen[0] > example.aux_rejected[0]


def test_missing_reward_column_is_a_user_error():
    reward = CombinedReward.from_specs(["column:helpfulness:1.0"])
    with pytest.raises(UserError, match="helpfulness"):
        build_preference_data([{"prompt": "p", "chosen": "c", "rejected": "r"}], TOK, TokenizeSettings(16),
                              reward=reward)


# ------------------------------------------------------------------ batches
def test_padded_labels_are_shifted_response_tokens():
    examples = _examples()
    batch = collate_padded(examples, TOK.pad_token_id)
    assert batch.input_ids.shape[0] == 2 * len(examples)
    rows = [(e, e.chosen_ids) for e in examples] + [(e, e.rejected_ids) for e in examples]
    for row, (e, response) in enumerate(rows):
        keep = batch.labels[row] != IGNORE_INDEX
        assert batch.labels[row][keep].tolist() == response
        positions = keep.nonzero().squeeze(1)
        # Position t predicts token t + 1.
        assert torch.equal(batch.input_ids[row, positions + 1], batch.labels[row, positions])
        assert int(positions[0]) == len(e.prompt_ids) - 1
    assert batch.prompt_last_index.tolist() == [len(e.prompt_ids) - 1 for e in examples]


def test_packed_batch_matches_padded_batch():
    examples = _examples()
    padded = collate_padded(examples, TOK.pad_token_id)
    packed = collate_packed(examples)
    real = padded.attention_mask.bool()
    assert torch.equal(packed.input_ids[0], padded.input_ids[real])
    assert torch.equal(packed.labels, padded.labels[real])
    lengths = real.sum(1)
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [0] + torch.cumsum(lengths, 0).tolist()
    expected_positions = torch.cat([torch.arange(int(n)) for n in lengths])
    assert torch.equal(packed.position_ids[0], expected_positions)
    flat_prompt_last = packed.cu_seqlens[:len(examples)].long() + padded.prompt_last_index
    assert torch.equal(packed.prompt_last_index, flat_prompt_last)
    assert packed.num_tokens == padded.num_tokens


# ------------------------------------------------------------------ sampling
def test_sampler_is_seeded_sharded_and_resumable():
    indices = list(range(10, 30))
    single = PairSampler(indices, 4, seed=3)
    ranks = [PairSampler(indices, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    position = DataPosition()
    seen = []
    for _ in range(12):  # 5 batches per epoch: crosses two epoch boundaries
        batch, after = single.next_batch(position)
        shares = [s.next_batch(position)[0] for s in ranks]
        assert shares[0] + shares[1] == batch
        seen.append(batch)
        position = after
    assert position.epoch == 2
    first_epoch = [i for b in seen[:5] for i in b]
    assert sorted(first_epoch) == indices
    assert seen[:5] != seen[5:10]  # a new permutation per epoch
    # Same seed, same batches from a saved position.
    again = PairSampler(indices, 4, seed=3).next_batch(DataPosition(1, 8))[0]
    assert again == seen[7]


def test_sampler_rejects_uneven_shards_and_oversized_batches():
    with pytest.raises(UserError, match="divisible"):
        PairSampler(range(10), 3, seed=0, world_size=2)
    with pytest.raises(UserError, match="larger than"):
        PairSampler(range(3), 4, seed=0)


def test_split_is_seeded_and_disjoint():
    train, evaluation = split_train_eval(50, 0.2, seed=1)
    assert len(evaluation) == 10 and not set(train) & set(evaluation)
    assert split_train_eval(50, 0.2, seed=1) == (train, evaluation)


def test_hugging_face_dataset_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 3
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    assert load_records(str(tmp_path / "saved")) == rows
    with pytest.raises(UserError, match="no split 'test'"):
        load_records(str(tmp_path / "saved"), split="test")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_records(str(tmp_path / "files")) == rows
