"""The ``filler`` reward (stock openers and closers at an answer's two ends) against hand-computed values."""
import pytest

from upo.rewards import CombinedReward, filler, filler_share, load_filler_phrases
from upo.rewards.filler import normalize_sentence, sentences


@pytest.mark.parametrize("text, expected", [
    # both ends filler: 1/2 + 1/2
    ("Here is what you need to know. The water is warm. That is all there is to it.", 1.0),
    # the opener only: 1/2 (the last sentence says something)
    ("Here is the answer. The water evaporates faster than the air. So the skin is dry.", 0.5),
    # the closer only, after a colon-less answer; '!' ends a sentence
    ("Water it when the soil is dry. Hope this helps!", 0.5),
    # one sentence is both ends
    ("That is all there is to it.", 1.0), ("Water it daily.", 0.0),
    # ':' ends a sentence, curly apostrophes and case do not matter
    ("Here\u2019s what you need to know: water it.", 0.5), ("SURE! Water it daily", 0.5),
    # filler in the middle is not at an end
    ("Water it. Sure. Pinch the leaves.", 0.0),
    # a sentence that only starts like a phrase is not the phrase
    ("Sure thing, water it daily. Done.", 0.0), ("Here is the answer to it. Water it.", 0.0),
    # no sentence at all
    ("", 0.0), ("... !!", 0.0), ("42.", 0.0),
    # line breaks end sentences; a repetition loop of filler is filler at both ends
    ("Good question\nWater it daily\nGood luck", 1.0),
    ("Here is what you need to know. Here is what you need to know.", 1.0),
])
def test_filler_share_of_hand_checked_answers(text, expected):
    assert filler("any prompt", text) == expected


def test_sentences_are_normalised_pieces_with_a_letter():
    assert sentences("Sure!  Water it,  daily... 42. Hope  this helps") == ["sure", "water it daily", "hope this helps"]
    assert normalize_sentence("That\u2019s ALL there is to it!") == "that's all there is to it"


def test_phrases_come_from_the_file_and_a_given_set_is_used():
    phrases = load_filler_phrases()
    assert {"sure", "here is what you need to know", "that is all there is to it", "hope this helps"} <= phrases
    assert all(phrase == normalize_sentence(phrase) for phrase in phrases)
    assert filler_share("Water it. Done.", frozenset({"done"})) == 0.5


def test_the_spec_weights_it():
    reward = CombinedReward.from_specs(["filler:-1.0"])
    scores = reward.score_batch(["q", "q"], ["Sure. Water it.", "Water it."])
    assert reward.names == ["filler"] and reward.combine(scores).tolist() == [-0.5, 0.0]
