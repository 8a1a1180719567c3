"""What ``upo-frontier`` measures on generations, against hand computations: the designer and user rewards of
completions, their length, degenerate answers (planted cases), the KL estimate on the policy's own completions;
and the powered micro grid (an SFT stage of --sft-passes, three seeds, two sampled completions per prompt, a greedy
diagnostic, prompts without labels, the trait-rate gate, the comparison): schema, the SFT stage trained once and
reused, the gate stopping a grid, bad flags."""
import contextlib
import json
import math

import pytest
import torch
from torch import nn

from helpers import MICRO_MODEL, one_thread  # noqa: F401  (fixture used by pytestmark)
from train_helpers import assert_one_line_error
from upo.frontier.cli import main
from upo.frontier.generated import completion_logprob_sums, generate, is_degenerate, kl_estimate
from upo.frontier.measure import GenerateSettings
from upo.rewards import CombinedReward
from upo.train.data import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, degenerate", [
    ("", True), ("   \n ", True),  # empty
    ("yes yes yes yes yes", True),  # 3 trigrams, 2 repeat an earlier one: 0.67
    ("Use a pan. Stir it. Use a pan. Stir it.", True),  # 8 words, 6 trigrams, 4 distinct: 0.33 > 0.3
    ("Use a pan. Stir it. Serve it warm. Use a pan.", False),  # 10 words, 8 trigrams, 1 repeat: 0.125
    ("Yes.", False), ("No no", False),  # fewer words than a trigram: not empty, so not degenerate
    ("Put the eggs in cold water, bring them to a boil and cook for nine minutes.", False),
])
def test_degenerate_answers(text, degenerate):
    assert is_degenerate(text) is degenerate


class ScriptedModel(nn.Module):
    """Writes a fixed completion (then EOS) after every prompt; its logits are fixed per vocabulary entry."""

    def __init__(self, completions: dict[int, list[int]], logits: list[float]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # a device for generate_completions
        self.completions = completions  # prompt length -> completion ids
        self.fixed = torch.tensor(logits)

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            new = (self.completions[sum(mask)] + [ByteTokenizer.eos_token_id])[:max_new_tokens]
            rows.append(ids + new + [ByteTokenizer.pad_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.fixed.expand(*input_ids.shape, -1)})()


def test_generations_are_scored_with_the_designer_and_the_user_reward():
    tokenizer = ByteTokenizer()
    texts = ["Maybe use low heat. Perhaps stir it.", "The cat sat."]
    prompts = [tokenizer.encode("Q1?"), tokenizer.encode("Longer Q2?")]
    model = ScriptedModel({len(p): tokenizer.encode(t) for p, t in zip(prompts, texts)}, [0.0] * 259)
    aux, user = CombinedReward.from_specs(["readability:1.0"]), CombinedReward.from_specs(["lexicon:hedging:-1.0"])
    out = generate(model, tokenizer, prompts, ["Q1?", "Longer Q2?"], aux, user, GenerateSettings(2, 64, 0.0, 0))
    assert out.texts == texts
    # user: 2 hedging words (maybe, perhaps) of 7; none of 3
    assert out.user_reward == pytest.approx([-2 / 7, 0.0])
    # readability of "The cat sat.": Flesch 206.835 - 1.015 * 3 words - 84.6 * 3 syllables / 3 words = 119.19
    assert out.aux_reward[1] == pytest.approx((206.835 - 1.015 * 3 - 84.6 * 1) / 100)
    summary = out.summary()
    assert summary["length_generated"] == pytest.approx((len(texts[0]) + 1 + len(texts[1]) + 1) / 2)  # + EOS each
    assert summary["user_reward_generated"] == pytest.approx(-1 / 7)
    assert summary["degenerate_share_generated"] == 0.0
    cut = generate(model, tokenizer, prompts, ["Q1?", "Longer Q2?"], aux, user, GenerateSettings(2, 5, 0.0, 0))
    assert cut.texts == [texts[0][:5], texts[1][:5]] and [len(ids) for ids in cut.ids] == [5, 5]  # no EOS written


def test_kl_estimate_on_the_policys_own_completions():
    """Policy: uniform over 4 entries (log p = -log 4); reference: logits log(1, 2, 3, 4) (log p = log(k / 10))."""
    policy = ScriptedModel({}, [0.0, 0.0, 0.0, 0.0])
    reference = ScriptedModel({}, [math.log(k) for k in (1, 2, 3, 4)])
    prompts, completions = [[0, 1], [2]], [[3, 1], []]
    assert completion_logprob_sums(policy, prompts, completions) == pytest.approx([-2 * math.log(4), 0.0])
    assert completion_logprob_sums(reference, prompts, completions) == pytest.approx(
        [math.log(4 / 10) + math.log(2 / 10), 0.0])
    generations = type("G", (), {"ids": completions})()
    expected = (-2 * math.log(4) - math.log(0.4) - math.log(0.2) + 0.0) / 2  # the empty completion counts 0
    assert kl_estimate(policy, contextlib.nullcontext(reference), prompts, generations) == pytest.approx(expected)
    assert kl_estimate(policy, None, prompts, generations) is None


# ---- the powered micro grid: an SFT stage, three seeds, sampled completions ----------------------------------
MICRO_TRAIN_ARGS = ["--", "--model-config", json.dumps(MICRO_MODEL), "--batch-size", "4", "--backend", "torch",
                    "--device", "cpu"]
SEEDS = (0, 1, 2)
PROMPTS = 10  # the 6 held-out pairs' prompts, then 4 of the file's questions: 20 completions, enough for the gate
SAMPLES, GREEDY = 2, 3


def micro_grid(tmp_path, *extra, seeds=len(SEEDS), trait=("length:1", "0.5,1")):
    from upo.rewards import RESOURCES_DIR

    argv = ["--output-dir", str(tmp_path / "grid"), "--steps", "2", "--max-examples", "24", "--eval-fraction", "0.25",
            "--bases", "sigmoid", "--lambdas", "0,1", "--mixes", "1", "--no-progress", "--seeds", str(seeds),
            "--sft-passes", "0.25", "--generate", str(PROMPTS), "--generate-max-tokens", "6",
            "--generate-samples", str(SAMPLES), "--generate-temperature", "1", "--generate-greedy", str(GREEDY),
            "--generate-prompts", str(RESOURCES_DIR / "frontier_prompts.txt"), "--trait", trait[0],
            "--trait-rate", trait[1], *extra, *MICRO_TRAIN_ARGS, "--lora"]  # LoRA: the reference is the adapters off
    return main(argv)


SFT_TRAININGS = []


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Three seeds of three runs after an SFT stage, with sampled generations; every SFT training counted."""
    import upo.frontier.study as study

    tmp_path = tmp_path_factory.mktemp("frontier-sft")
    run_sft = study.run_sft

    def counted(*args, **kwargs):
        SFT_TRAININGS.append(args)
        return run_sft(*args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one_thread is per test, this fixture per module: tiny matmuls, one thread
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(study, "run_sft", counted)
            assert micro_grid(tmp_path) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "grid"
    return out, json.loads((out / "frontier.json").read_text())


GENERATION_FIELDS = tuple(f"{measure}_{suffix}" for suffix in ("generated", "greedy") for measure in (
    "aux_reward", "user_reward", "length", "degenerate_share", "kl", "trait_rate"))


def test_every_run_and_seed_is_measured_on_its_generations(grid):
    _, report = grid
    assert report["seeds"] == list(SEEDS) and report["user_reward"] == ["lexicon:hedging:-1.0"]
    assert [(r["name"], r["seed"]) for r in report["runs"]] == [
        (name, seed) for seed in SEEDS for name in ("upo-sigmoid-lambda0", "upo-sigmoid-lambda1",
                                                    "relabel-sigmoid-mix1")]
    for run in report["runs"]:
        for field in GENERATION_FIELDS + ("kl_generated_stderr",):
            assert isinstance(run[field], float) and math.isfinite(run[field]), (field, run[field])
        assert 0.0 <= run["degenerate_share_generated"] <= 1.0 and 1.0 <= run["length_generated"] <= 6.0
        assert 0.0 <= run["trait_rate_generated"] <= 1.0
        assert run["preference_accuracy"] == pytest.approx(run["eval_rewards_accuracies"])  # the diagnostic stays
        assert {"grad_norm", "aux/beta_aux", "value/grad_norm"} <= set(run["training"]) if run["upo_lambda"] else (
            "grad_norm" in run["training"])
        assert run["training"]["grad_norm"]["steps"] == 2
    for entry in report["summary"]:
        runs = [r for r in report["runs"] if r["name"] == entry["name"]]
        assert entry["seeds"] == list(SEEDS)
        for field in GENERATION_FIELDS + ("preference_accuracy",):
            values = [r[field] for r in runs]
            mean = sum(values) / 3
            assert entry[field] == pytest.approx(mean)
            assert (entry[f"{field}_min"], entry[f"{field}_max"]) == (min(values), max(values))
            assert entry[f"{field}_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 2))


def test_the_report_holds_the_sampling_the_gates_and_the_comparison(grid):
    out, report = grid
    generate = report["generate"]
    assert (generate["prompts"], generate["held_out_prompts"], generate["samples_per_prompt"]) == (PROMPTS, 6, SAMPLES)
    assert (generate["temperature"], generate["greedy_prompts"]) == (1.0, GREEDY)
    reference = generate["reference"][0]
    assert reference["seed"] == 0 and reference["kl_generated"] is None
    gate = report["gates"]["trait_rate"]  # length:1 > 0: a completion with a word
    assert gate["passed"] and gate["rate"] == reference["trait_rate_generated"] >= 0.5
    assert gate["completions"] == PROMPTS * SAMPLES
    assert gate["range"] == [0.5, 1.0] and report["gates"]["trait"] == ["length:1"]
    control = report["comparison"]["positive_control"]["sigmoid"]
    assert control["seeds"] == list(SEEDS) and set(control) >= {"shift", "seed_sd", "threshold", "passed"}
    if control["passed"]:
        number = report["comparison"]["upo_minus_relabelling"]
        assert number["seeds"] == list(SEEDS) and len(number["per_seed"]) == 3
    else:
        assert report["comparison"]["upo_minus_relabelling"] is None
        assert report["comparison"]["verdict"].startswith("the experiment cannot detect an effect")
    assert report["sft"]["passes"] == 0.25 and report["sft"]["steps"] == 3  # ceil(0.25 x 36 rows / 4 per step)
    lines = [json.loads(line) for line in (out / report["runs"][0]["output_dir"] / "generations.jsonl").open()]
    assert len(lines) == PROMPTS * SAMPLES + GREEDY
    assert [line["sample"] for line in lines[:4]] == [0, 1, 0, 1] and lines[0]["prompt"] == lines[1]["prompt"]
    assert lines[-1]["decoding"] == "greedy" and lines[0]["decoding"] == "sampled at temperature 1"
    sampled = lines[:-GREEDY]
    assert sum(line["kl"] for line in sampled) / len(sampled) == pytest.approx(report["runs"][0]["kl_generated"])
    assert sum(line["trait"] > 0 for line in sampled) / len(sampled) == report["runs"][0]["trait_rate_generated"]
    questions = [line["prompt"] for line in lines[:PROMPTS * SAMPLES:SAMPLES]]
    assert questions[6:8] == ["How do I keep lettuce crisp in the fridge?", "How do I stop my headphones from tangling?"]


def test_the_trait_rate_gate_stops_the_study_before_its_grid(tmp_path, capsys):
    """filler never appears in the tiny model's byte noise: a rate of 0, outside 30-70 %."""
    code = micro_grid(tmp_path, seeds=1, trait=("filler:1", "0.3,0.7"))
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("upo-frontier: trait-rate gate: the reference writes the trait") and "0 %" in err
    report = json.loads((tmp_path / "grid" / "frontier.json").read_text())
    assert report["runs"] == [] and report["comparison"] is None and not report["gates"]["trait_rate"]["passed"]
    assert report["gates"]["trait_rate"]["rate"] == 0.0 and not (tmp_path / "grid" / "runs").exists()


def test_a_quick_look_with_too_few_completions_is_not_gated(tmp_path):
    """4 completions measure no rate: the gate is not measured and the grid runs."""
    assert micro_grid(tmp_path, "--generate", "2", "--lambdas", "0", seeds=1, trait=("filler:1", "0.3,0.7")) == 0
    report = json.loads((tmp_path / "grid" / "frontier.json").read_text())
    assert report["gates"]["trait_rate"]["passed"] is None and len(report["runs"]) == 2


def test_the_sft_stage_is_trained_once_and_every_run_starts_from_it(grid):
    out, report = grid
    configs = [json.loads(path.read_text()) for path in out.rglob("config.json") if path.parent.name != "model"]
    sft = [c for c in configs if c["loss_type"] == ["sft"]]
    assert len(SFT_TRAININGS) == 1  # trained once for the nine runs of the three seeds
    assert len(sft) == 1 and len(configs) == 1 + 9  # one SFT stage, nine runs
    assert len((out / "sft" / "metrics.jsonl").read_text().splitlines()) == report["sft"]["steps"] == 3
    assert report["sft"]["examples"] == 2 * report["dataset"]["train_pairs"]  # both responses of every pair
    runs = [c for c in configs if c["loss_type"] != ["sft"]]
    assert {c["model"] for c in runs} == {str(out / "sft" / "model")} and {c["seed"] for c in runs} == set(SEEDS)
    assert len(report["generate"]["reference"]) == 1  # one reference for every run of every seed
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, fragment", [
    (["--seeds", "0"], "--seeds must be an integer >= 1, got 0"),
    (["--sft-steps", "-1"], "--sft-steps must be an integer >= 0, got -1"),
    (["--sft-lr", "0"], "--sft-lr must be a finite number > 0"),
    (["--user-reward", "politeness:1"],
     "bad --user-reward politeness:1: reward spec 'politeness:1': unknown reward 'politeness'"),
    (["--model", "/nonexistent/model"], "--model /nonexistent/model"),
    (["--sft-steps", "2"], "give --sft-steps or --sft-passes, not both"),
    (["--sft-passes", "nan"], "--sft-passes must be a finite number > 0, got nan"),
    (["--generate-samples", "0"], "--generate-samples must be an integer >= 1, got 0"),
    (["--generate-temperature", "0"], "--generate-samples 2 needs --generate-temperature > 0"),
    (["--generate-greedy", "-1"], "--generate-greedy must be an integer >= 0, got -1"),
    (["--trait-rate", "0.7,0.3"], "--trait-rate must be two shares LOW,HIGH with LOW < HIGH"),
    (["--trait-rate", "0.3,1.5"], "--trait-rate: 1.5 must be a finite number in [0, 1]"),
    (["--trait", "shouting:1"], "bad --trait length:1 shouting:1: reward spec 'shouting:1': unknown reward 'shouting'"),
    (["--generate-prompts", "/nonexistent/prompts.txt"], "--generate-prompts /nonexistent/prompts.txt: No such file"),
])
def test_bad_flags_are_one_line_before_any_run(tmp_path, capsys, extra, fragment):
    assert micro_grid(tmp_path, *extra) == 2
    assert_one_line_error(2, capsys.readouterr().err, fragment, prog="upo-frontier")
    assert not (tmp_path / "grid" / "runs").exists()


def test_a_shipped_file_is_found_by_its_name(tmp_path):
    from upo.frontier.cli import plan

    study, _ = plan(["--output-dir", str(tmp_path / "grid"), "--dataset", "preferences_conflict_chat.jsonl",
                     "--max-examples", "12", "--bases", "sigmoid", "--lambdas", "0", "--mixes", "1",
                     *MICRO_TRAIN_ARGS])
    assert study.dataset == "upo/resources/preferences_conflict_chat.jsonl" and len(study.train_rows) == 10


def test_the_model_is_refused_after_the_double_dash(tmp_path, capsys):
    argv = ["--output-dir", str(tmp_path / "grid"), "--no-progress", "--", "--model", "smollm2"]
    assert main(argv) == 2
    assert_one_line_error(2, capsys.readouterr().err, "use upo-frontier's --model", prog="upo-frontier")


def test_a_stop_signal_in_a_runs_last_step_stops_the_grid_after_that_run():
    """upo-train finishes a run whose last step saw SIGTERM; the grid must not go on to the next run."""
    import signal

    from upo.train.signals import stop_if_signalled
    from upo.train.errors import RunStopped

    stop_if_signalled(type("Trainer", (), {"stop_signum": 0})())
    with pytest.raises(RunStopped) as stopped:
        stop_if_signalled(type("Trainer", (), {"stop_signum": int(signal.SIGTERM)})())
    assert stopped.value.exit_code == 143
