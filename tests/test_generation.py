"""``upo-train --eval-generate N``: completions of held-out prompts by the policy and the reference, scored with
the run's auxiliary rewards, in the final metrics and ``generations.jsonl``."""
import json

import pytest

from helpers import MICRO_MODEL, one_thread  # noqa: F401  (fixture used by pytestmark)
from train_helpers import assert_one_line_error, metrics_rows, micro_args, run_main
from upo.rewards import length, readability

pytestmark = pytest.mark.usefixtures("one_thread")


def generate_args(tmp_path, *extra):
    args = micro_args(tmp_path, "--max-examples", "12", "--eval-fraction", "0.25", "--max-steps", "2",
                      "--eval-generate", "2", "--eval-generate-max-tokens", "12", *extra)
    return args


def generations(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]


def test_final_metrics_hold_policy_and_reference_rewards_of_the_completions(tmp_path, capsys):
    code, out, err = run_main(generate_args(tmp_path, "--eval-every", "1"), capsys)
    assert code == 0, err
    last = metrics_rows(tmp_path / "out")[-1]
    records = generations(tmp_path)
    assert len(records) == 2
    for role in ("policy", "reference"):
        scores = [readability(r["prompt"], r[role]) for r in records]  # the run's aux reward: readability:1.0
        assert [r[f"aux_reward_{role}"] for r in records] == pytest.approx(scores, abs=1e-6)
        assert last[f"eval/generate/aux_reward_{role}"] == pytest.approx(sum(scores) / 2, abs=1e-6)
        assert last[f"eval/generate/readability/{role}"] == pytest.approx(sum(scores) / 2, abs=1e-6)
        assert 0 < last[f"eval/generate/chars_{role}"] <= 12 * 4  # at most 12 new tokens of UTF-8 bytes
    assert "generated completions, aux reward: policy" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "generate/aux_reward_policy" in summary["eval"]
    earlier = metrics_rows(tmp_path / "out")[:-1]
    assert "eval/loss" in earlier[0]  # evaluated at step 1, but completions only at the end
    assert not any("generate" in key for row in earlier for key in row)


def test_without_upo_the_given_reward_scores_the_completions(tmp_path, capsys):
    code, _, err = run_main(generate_args(tmp_path, "--loss-type", "sigmoid", "--aux-reward", "length:1.0"), capsys)
    assert code == 0, err
    last = metrics_rows(tmp_path / "out")[-1]
    records = generations(tmp_path)
    expected = sum(length(r["prompt"], r["policy"]) for r in records) / len(records)
    assert last["eval/generate/aux_reward_policy"] == pytest.approx(expected, abs=1e-6)
    assert "eval/generate/length/policy" in last


def test_sampled_completions_are_seeded(tmp_path, capsys):
    texts = []
    for name, temperature in (("a", "1.5"), ("b", "1.5"), ("greedy", "0")):
        code, _, err = run_main(generate_args(tmp_path / name, "--eval-generate-temperature", temperature), capsys)
        assert code == 0, err
        texts.append([r["policy"] for r in generations(tmp_path / name)])
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]  # sampled, not greedy


def test_generate_completions_seeds_sampling_and_leaves_the_random_state_alone():
    import torch
    from transformers import AutoModelForCausalLM

    from upo.train.data import ByteTokenizer
    from upo.train.generation import generate_completions
    from upo.train.models import tiny_llama_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(MICRO_MODEL))
    tokenizer, prompts = ByteTokenizer(), [[2, 80, 81], [2, 90]]
    state = torch.get_rng_state()
    first = generate_completions(model, tokenizer, prompts, 8, temperature=1.5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # training's random numbers are untouched
    assert generate_completions(model, tokenizer, prompts, 8, temperature=1.5, seed=1) == first
    assert generate_completions(model, tokenizer, prompts, 8, temperature=1.5, seed=2) != first
    greedy = generate_completions(model, tokenizer, prompts, 8)
    assert greedy == generate_completions(model, tokenizer, [prompts[0]], 8) + generate_completions(
        model, tokenizer, [prompts[1]], 8)  # left padding does not change a completion
    assert all(len(ids) <= 8 and tokenizer.eos_token_id not in ids for ids in greedy)


@pytest.mark.parametrize("extra, fragment", [
    (["--eval-generate", "-1"], "--eval-generate must be an integer >= 0"),
    (["--eval-generate-max-tokens", "0"], "--eval-generate-max-tokens must be an integer >= 1"),
    (["--eval-generate-temperature", "-0.5"], "--eval-generate-temperature must be a finite number >= 0"),
    (["--fsdp"], "--eval-generate needs the whole model in one process"),
])
def test_bad_generation_settings(tmp_path, capsys, extra, fragment):
    code, _, err = run_main(generate_args(tmp_path, *extra), capsys)
    assert_one_line_error(code, err, fragment)
