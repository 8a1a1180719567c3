"""Designer rewards: Flesch arithmetic, syllables, built-ins, weights, columns, specs, errors."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from upo import rewards as R
from upo.rewards import (
    CombinedReward,
    RewardSpec,
    available_rewards,
    count_sentences,
    count_syllables,
    flesch_reading_ease,
    parse_reward_spec,
    parse_reward_specs,
    readability,
    register_reward,
    unregister_reward,
)

SIMPLE = "The cat sat on the mat. It was fun. We had tea."
CONVOLUTED = (
    "Notwithstanding considerable methodological heterogeneity, comprehensive "
    "utilization of sophisticated organizational infrastructure necessitates "
    "substantial interdepartmental coordination."
)


def flesch(words, sentences, syllables):
    return 206.835 - 1.015 * words / sentences - 84.6 * syllables / words


# --------------------------------------------------------------------------- Flesch and syllables


@pytest.mark.parametrize(
    "word, expected",
    [
        ("cat", 1), ("the", 1), ("make", 1), ("whale", 1), ("smile", 1), ("free", 1),
        ("table", 2), ("apple", 2), ("little", 2), ("people", 2), ("simple", 2), ("agree", 2),
        ("movie", 2), ("happy", 2), ("yellow", 2), ("jumped", 1), ("wanted", 2), ("needed", 2),
        ("makes", 1), ("boxes", 2), ("changes", 2), ("tables", 2), ("banana", 3),
        ("beautiful", 3), ("computer", 3), ("education", 4), ("readability", 5),
        ("communication", 5), ("facilitates", 4), ("understanding", 4), ("don't", 1),
        ("Table", 2), ("a", 1),
    ],
)
def test_count_syllables(word, expected):
    assert count_syllables(word) == expected


def test_count_syllables_has_no_zero_for_words():
    assert count_syllables("") == 0
    assert count_syllables("bcd") == 1  # no vowel: still one syllable per word


def test_count_sentences():
    assert count_sentences("One. Two! Three? Four") == 4
    assert count_sentences("Wait... what?!") == 2
    assert count_sentences("no punctuation at all") == 1
    assert count_sentences("... !!! 42.") == 0  # pieces without words are not sentences


@pytest.mark.parametrize(
    "text, words, sentences, syllables",
    [
        # the1 cat1 sat1 on1 the1 mat1 | it1 was1 hap-py2
        ("The cat sat on the mat. It was happy.", 9, 2, 10),
        # com-mu-ni-ca-tion5 fa-cil-i-tates4 un-der-stand-ing4
        ("Communication facilitates understanding.", 3, 1, 13),
        # make1 a1 ta-ble2 | bake1 a1 cake1 ; numbers are not words
        ("Make a table. Bake 2 a cake!", 6, 2, 7),
    ],
)
def test_flesch_known_values(text, words, sentences, syllables):
    assert flesch_reading_ease(text) == pytest.approx(flesch(words, sentences, syllables), abs=1e-9)
    expected = max(-1.0, flesch(words, sentences, syllables) / 100)
    assert readability("ignored prompt", text) == pytest.approx(expected, abs=1e-12)


def test_readability_ignores_prompt_and_scales_by_100():
    text = "Go to bed on time."
    assert readability("a", text) == readability("a much longer prompt", text)
    assert readability("", text) == pytest.approx(flesch_reading_ease(text) / 100)


def test_readability_prefers_simple_text():
    assert readability("", SIMPLE) > 0.9
    assert readability("", CONVOLUTED) < 0.0
    assert readability("", SIMPLE) > readability("", CONVOLUTED) + 0.5


@pytest.mark.parametrize("text", ["", "   ", "...", "!!!", "42 17", "a", "I.", "\n\t"])
def test_readability_is_finite_on_empty_and_tiny_text(text):
    value = readability("", text)
    assert math.isfinite(value)
    assert -1.0 <= value <= 1.22


def test_readability_without_words_is_zero_and_floor_bounds_extremes():
    assert readability("", "") == 0.0
    assert flesch_reading_ease("Antidisestablishmentarianism.") < -500
    assert readability("", "Antidisestablishmentarianism.") == -1.0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_readability_is_bounded_on_any_text(text):
    value = readability("", text)
    assert math.isfinite(value) and -1.0 <= value <= 1.22


def test_readability_agrees_loosely_with_textstat():
    textstat = pytest.importorskip("textstat")
    texts = [
        SIMPLE,
        CONVOLUTED,
        "Put the eggs in a pot of cold water. Bring it to a boil.",
        "The committee reviewed the proposal and decided to postpone the final decision.",
        "Photosynthesis converts electromagnetic radiation into chemical energy within chloroplasts.",
        "I like dogs. Dogs like me. We run in the park.",
        "Considering the multiplicity of relevant factors, it is considerably preferable to "
        "utilize a comprehensive methodology.",
        "Read ten pages before bed. Stop books you do not enjoy.",
    ]
    ours = torch.tensor([flesch_reading_ease(t) for t in texts], dtype=torch.float64)
    try:
        theirs_list = [float(textstat.flesch_reading_ease(t)) for t in texts]
    except (LookupError, OSError) as error:  # textstat may need to download a dictionary
        pytest.skip(f"textstat cannot run here: {type(error).__name__}")
    theirs = torch.tensor(theirs_list, dtype=torch.float64)
    correlation = torch.corrcoef(torch.stack([ours, theirs]))[0, 1].item()
    assert correlation > 0.95
    assert (ours - theirs).abs().mean().item() < 15.0


# --------------------------------------------------------------------------- length and lexicon


def test_length_counts_whitespace_words_over_100():
    assert R.length("", "one two  three\nfour") == pytest.approx(0.04)
    assert R.length("", "") == 0.0
    assert R.length("", " ".join(["w"] * 250)) == pytest.approx(2.5)


def test_lexicon_default_jargon_fraction():
    # words: we utilize and leverage tools -> 2 of 5 in the jargon list
    assert R.lexicon("", "We utilize and LEVERAGE tools.") == pytest.approx(0.4)
    assert R.lexicon("", "We use good tools.") == 0.0
    assert R.lexicon("", "") == 0.0


def test_bundled_lexicons_load():
    assert {"jargon", "hedging"} <= set(R.bundled_lexicons())
    assert "utilize" in R.load_lexicon("jargon")
    assert "perhaps" in R.load_lexicon("hedging")
    assert R.lexicon("", "Perhaps it works.", lexicon_path="hedging") == pytest.approx(1 / 3)


def test_lexicon_user_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# my list\nBanana\n\napple  # fruit\n", encoding="utf-8")
    assert R.load_lexicon(path) == frozenset({"banana", "apple"})
    assert R.lexicon("", "An apple and a banana.", lexicon_path=path) == pytest.approx(2 / 5)
    combined = CombinedReward.from_specs([f"lexicon:{path}:-2"])
    assert combined.names == [f"lexicon:{path}"]
    assert combined.score("", "apple pie") == pytest.approx(-2 * 0.5)


def test_lexicon_missing_or_empty_file_fails_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="jargon"):
        CombinedReward.from_specs([f"lexicon:{tmp_path / 'absent.txt'}:1"])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no words"):
        CombinedReward.from_specs([f"lexicon:{empty}:1"])


# --------------------------------------------------------------------------- combining


def test_combined_weights_names_and_score():
    rewards = CombinedReward.from_specs(["readability:1.0", "length:-0.1"])
    assert rewards.names == ["readability", "length"]
    assert rewards.weights == [1.0, -0.1]
    assert len(rewards) == 2
    response = "The cat sat on the mat. It was happy."
    expected = readability("", response) - 0.1 * 0.09
    assert rewards.score("p", response) == pytest.approx(expected)
    assert rewards.score_terms("p", response) == pytest.approx([readability("", response), 0.09])


def test_score_batch_shape_dtype_and_combine():
    rewards = CombinedReward.from_specs("readability:2, length:-0.5")
    prompts = ["a", "b", "c"]
    responses = [SIMPLE, CONVOLUTED, ""]
    scores = rewards.score_batch(prompts, responses)
    assert scores.shape == (3, 2) and scores.dtype == torch.float32
    assert scores[:, 0].tolist() == pytest.approx([readability("", r) for r in responses], abs=1e-6)
    assert scores[:, 1].tolist() == pytest.approx([R.length("", r) for r in responses], abs=1e-6)
    combined = rewards.combine(scores)
    assert combined.shape == (3,)
    expected = [rewards.score(p, r) for p, r in zip(prompts, responses)]
    assert combined.tolist() == pytest.approx(expected, abs=1e-5)


def test_empty_combined_reward_gives_zero_columns():
    rewards = CombinedReward.from_specs([])
    scores = rewards.score_batch(["p", "q"], ["x", "y"])
    assert scores.shape == (2, 0)
    assert rewards.combine(scores).tolist() == [0.0, 0.0]


def test_callables_with_weights_and_unique_names():
    def exclamations(prompt, response):
        return response.count("!")

    rewards = CombinedReward([(exclamations, 2.0), (lambda p, r: len(p), 0.5), (lambda p, r: 1, 1)])
    assert rewards.names == ["exclamations", "lambda", "lambda_2"]
    assert rewards.score("abcd", "hi!!") == pytest.approx(2 * 2 + 0.5 * 4 + 1)


def test_mixed_items_in_constructor():
    rewards = CombinedReward(["readability:1", RewardSpec("length", -1.0), ("lexicon", 3)])
    assert rewards.names == ["readability", "length", "lexicon"]
    assert rewards.weights == [1.0, -1.0, 3.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_callable_non_finite_value_names_the_reward(bad):
    def flaky_reward(prompt, response):
        return bad

    rewards = CombinedReward([(flaky_reward, 1.0)])
    with pytest.raises(ValueError, match="flaky_reward"):
        rewards.score("p", "r")
    with pytest.raises(ValueError, match=r"flaky_reward.*batch item 0"):
        rewards.score_batch(["p"], ["r"])


@pytest.mark.parametrize("bad", [None, "0.5", [1.0]])
def test_callable_non_number_names_the_reward(bad):
    def wordy(prompt, response):
        return bad

    with pytest.raises(ValueError, match="wordy.*not a number"):
        CombinedReward([(wordy, 1.0)]).score("p", "r")


def test_score_batch_length_mismatch():
    rewards = CombinedReward.from_specs(["length:1"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rewards.score_batch(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="rows"):
        rewards.score_batch(["a"], ["x"], rows=[{}, {}])


def test_combine_checks_width():
    with pytest.raises(ValueError, match="expected 1"):
        CombinedReward.from_specs(["length:1"]).combine(torch.zeros(3, 2))


# --------------------------------------------------------------------------- column rewards


def test_column_reward_reads_the_row():
    rewards = CombinedReward.from_specs(["column:safety:0.5", "length:1"])
    assert rewards.names == ["column:safety", "length"]
    rows = [{"safety": 2.0}, {"safety": -1}]
    scores = rewards.score_batch(["p", "q"], ["one two", "x"], rows)
    torch.testing.assert_close(scores, torch.tensor([[2.0, 0.02], [-1.0, 0.01]]))
    assert rewards.combine(scores).tolist() == pytest.approx([1.02, -0.49])


def test_column_reward_sides_for_pairs():
    rewards = CombinedReward.from_specs(["column:score:1", "readability:0"])
    rows = [
        {"score_chosen": 9.0, "score_rejected": 3.0},  # UltraFeedback style
        {"chosen_score": 1.0, "rejected_score": -1.0},
        {"score": 0.5},  # one value for both sides
    ]
    chosen, rejected = rewards.score_pairs(["a", "b", "c"], ["x", "y", "z"], ["u", "v", "w"], rows)
    assert chosen[:, 0].tolist() == [9.0, 1.0, 0.5]
    assert rejected[:, 0].tolist() == [3.0, -1.0, 0.5]
    per_item = rewards.score_batch(["a", "a"], ["x", "u"], [rows[0], rows[0]], side=["chosen", "rejected"])
    assert per_item[:, 0].tolist() == [9.0, 3.0]


def test_column_reward_errors():
    rewards = CombinedReward.from_specs(["column:score:1"])
    with pytest.raises(ValueError, match="needs the dataset rows"):
        rewards.score_batch(["p"], ["r"])
    with pytest.raises(ValueError, match=r"score_chosen, chosen_score, score.*columns: other"):
        rewards.score_batch(["p"], ["r"], [{"other": 1}], side="chosen")
    with pytest.raises(ValueError, match="column:score.*not a number"):
        rewards.score_batch(["p"], ["r"], [{"score": "high"}])
    with pytest.raises(ValueError, match="column:score.*finite"):
        rewards.score_batch(["p"], ["r"], [{"score": float("nan")}])
    with pytest.raises(ValueError, match="side must be"):
        rewards.score_batch(["p"], ["r"], [{"score": 1}], side="left")


# --------------------------------------------------------------------------- parsing and registry


def test_parse_reward_spec_forms():
    assert parse_reward_spec("readability:1.0") == RewardSpec("readability", 1.0)
    assert parse_reward_spec(" length : -0.1 ") == RewardSpec("length", -0.1)
    assert parse_reward_spec("column:score:2") == RewardSpec("column", 2.0, "score")
    assert parse_reward_spec("lexicon:hedging:-1e-1") == RewardSpec("lexicon", -0.1, "hedging")
    # the weight is after the last colon, so paths with colons survive
    assert parse_reward_spec("lexicon:C:\\lists\\w.txt:1").arg == "C:\\lists\\w.txt"
    assert str(parse_reward_spec("column:score:2")) == "column:score:2.0"


def test_parse_reward_specs_list_and_string():
    expected = [RewardSpec("readability", 1.0), RewardSpec("length", -0.1)]
    assert parse_reward_specs(["readability:1.0", "length:-0.1"]) == expected
    assert parse_reward_specs("readability:1.0, length:-0.1,") == expected
    assert parse_reward_specs([]) == []


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown reward 'readabilty'") as info:
        parse_reward_spec("readabilty:1.0")
    for name in ["column", "length", "lexicon", "readability"]:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("readability:abc", "weight 'abc' is not a number"),
        ("readability:nan", "not finite"),
        ("readability:inf", "not finite"),
        ("readability:", "expected NAME:WEIGHT"),
        ("readability", "expected NAME:WEIGHT"),
        ("column:score", "expected column:COLUMN:WEIGHT"),
        ("column::1", "empty argument"),
        ("length:x:1", "takes no argument"),
    ],
)
def test_bad_specs_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_reward_spec(spec)
    assert repr(spec) in str(info.value)


def test_bad_weights_outside_strings():
    with pytest.raises(ValueError, match="not finite"):
        RewardSpec("length", float("nan"))
    with pytest.raises(ValueError, match="not a number"):
        CombinedReward([(lambda p, r: 1.0, "heavy")])
    with pytest.raises(ValueError, match="not a number"):
        CombinedReward([(lambda p, r: 1.0, True)])


def test_duplicates_are_refused():
    with pytest.raises(ValueError, match="repeat readability"):
        parse_reward_specs(["readability:1", "readability:2"])
    with pytest.raises(ValueError, match="given twice"):
        CombinedReward(["column:a:1", "column:a:2"])
    assert CombinedReward(["column:a:1", "column:b:2"]).names == ["column:a", "column:b"]


def test_register_reward_roundtrip():
    @register_reward("test_shout")
    def shout(prompt, response):
        return float(response.isupper())

    try:
        assert "test_shout" in available_rewards()
        rewards = CombinedReward.from_specs(["test_shout:3"])
        assert rewards.score("", "HEY") == 3.0
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_shout")(shout)
        register_reward("test_shout", overwrite=True)(lambda p, r: 0.0)
    finally:
        unregister_reward("test_shout")
    assert "test_shout" not in available_rewards()
    with pytest.raises(ValueError, match="unknown reward"):
        parse_reward_spec("test_shout:1")


@pytest.mark.parametrize("name", ["column", "a:b", "has space", ""])
def test_register_reward_refuses_bad_names(name):
    with pytest.raises(ValueError):
        register_reward(name)


def test_bad_items_are_type_errors():
    with pytest.raises(TypeError):
        CombinedReward([42])
    with pytest.raises(TypeError):
        CombinedReward([("readability",)])
