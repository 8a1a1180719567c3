"""UPOTrainer against TRL 1.16's DPOTrainer on a tiny offline model (docs/trl.md).

Parity: same model, data, seed and loss type, 3 steps each: the logged losses agree (relative
1e-5 at the first step, 1e-4 after) and so do the parameter updates (the norm of their
difference under 1 % of the update's norm). Then UPO's own parts: rewards scored once per
example, the aux metrics, the value head (its learning rate, its file, resume), PEFT,
precomputed reference log-probs, and the errors raised before training starts.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import trl_tiny  # noqa: I001  (sets the offline environment first)

trl = pytest.importorskip("trl")
import torch  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from upo.integrations.trl import VALUE_HEAD_FILE, UPOConfig, UPOTrainer, load_value_head  # noqa: E402
from upo.integrations.trl.rewards import AuxRewards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARITY_CASES = [["sigmoid"], ["ipo"], ["sigmoid", "sft"], ["apo_zero"]]


@functools.lru_cache(maxsize=None)
def dpo_run(loss_type: tuple[str, ...], steps: int = 3) -> trl_tiny.Run:
    return trl_tiny.run(DPOTrainer, DPOConfig, loss_type=list(loss_type), max_steps=steps)


def relative_errors(reference: list[dict], ours: list[dict], key: str = "loss") -> list[float]:
    assert len(reference) == len(ours)
    return [abs(a[key] - b[key]) / max(abs(a[key]), 1e-12) for a, b in zip(reference, ours)]


# -- parity with DPOTrainer

@pytest.mark.parametrize("loss_type", PARITY_CASES, ids="+".join)
def test_losses_and_updates_match_dpo_trainer(loss_type):
    reference = dpo_run(tuple(loss_type))
    ours = trl_tiny.run(UPOTrainer, UPOConfig, loss_type=loss_type)
    errors = relative_errors(reference.logs, ours.logs)
    ratio = trl_tiny.update_ratio(reference, ours)
    print(f"\nparity {loss_type}: loss rel errors {[f'{e:.1e}' for e in errors]}, update ratio {ratio:.1e}")
    assert errors[0] < 1e-5 and max(errors[1:]) < 1e-4, errors
    assert ratio < 0.01, ratio
    keys = ["rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
            "entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected"]  # the last four from upo's kernels
    for key in keys:
        assert [h[key] for h in ours.logs] == pytest.approx([h[key] for h in reference.logs], rel=1e-3, abs=2e-4), key


def test_lora_run_matches_dpo_trainer_with_adapters_off_reference():
    from peft import LoraConfig

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          task_type="CAUSAL_LM")

    settings = dict(loss_type=["sigmoid"], ref_model=False, max_steps=2, gradient_checkpointing=True)
    reference = trl_tiny.run(DPOTrainer, DPOConfig, peft_config=lora(), **settings)
    ours = trl_tiny.run(UPOTrainer, UPOConfig, peft_config=lora(), **settings)
    assert ours.trainer.ref_model is None  # the reference is the policy with its adapters disabled
    assert all("lora_" in name for name in ours.updates)
    errors = relative_errors(reference.logs, ours.logs)
    ratio = trl_tiny.update_ratio(reference, ours)
    print(f"\nparity LoRA sigmoid: loss rel errors {[f'{e:.1e}' for e in errors]}, update ratio {ratio:.1e}")
    assert errors[0] < 1e-5 and max(errors[1:]) < 1e-4, errors
    assert ratio < 0.01, ratio


def _reference_logps(trainer, rows: int, model):
    """``trainer.compute_ref_log_probs`` on one batch of its first ``rows`` prepared examples."""
    examples = [{k: trainer.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                for i in range(rows)]
    return trainer.compute_ref_log_probs(model, trainer.data_collator(examples))


def test_precomputed_reference_logps_equal_trl_and_train():
    dataset = trl_tiny.make_dataset(6, seed=11)  # a dataset no other test precomputes (TRL caches by content)
    ours = trl_tiny.run(UPOTrainer, UPOConfig, loss_type=["sigmoid"], ref_model=False, dataset=dataset,
                        precompute_ref_log_probs=True, max_steps=2)
    assert ours.trainer.ref_model is None and len(ours.logs) == 2
    computed = ours.trainer.train_dataset
    print(f"\nprecomputed sigmoid: losses {[round(h['loss'], 6) for h in ours.logs]}")
    # TRL's own reference log-probs of the same prepared rows, from its fused LM head
    reference = trl_tiny.run(DPOTrainer, DPOConfig, loss_type=["sigmoid"], dataset=trl_tiny.make_dataset(6, seed=11),
                             train=False)
    trl_chosen, trl_rejected = _reference_logps(reference.trainer, 6, reference.trainer.ref_model)
    gap = max(float((torch.tensor(computed[f"ref_{side}_logps"]) - trl).abs().max() / trl.abs().max())
              for side, trl in (("chosen", trl_chosen), ("rejected", trl_rejected)))
    print(f"precomputed reference log-probs vs TRL's: max relative difference {gap:.1e}")
    torch.testing.assert_close(torch.tensor(computed["ref_chosen_logps"]), trl_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(computed["ref_rejected_logps"]), trl_rejected, rtol=1e-5, atol=1e-5)


def test_reference_logps_with_ld_alpha_equal_trl():
    """LD-DPO's weighting of the reference sums (used once upo.loss takes ld_alpha) is TRL's."""
    ours = trl_tiny.run(UPOTrainer, UPOConfig, loss_type=["sigmoid"], train=False)
    ours.trainer._plan = dataclasses.replace(ours.trainer._plan, kwargs={**ours.trainer._plan.kwargs, "ld_alpha": 0.3})
    reference = trl_tiny.run(DPOTrainer, DPOConfig, loss_type=["sigmoid"], ld_alpha=0.3, train=False)
    expected = _reference_logps(reference.trainer, 8, reference.trainer.ref_model)
    got = _reference_logps(ours.trainer, 8, ours.trainer.ref_model)
    plain = _reference_logps(trl_tiny.run(DPOTrainer, DPOConfig, train=False).trainer, 8, reference.trainer.ref_model)
    for ours_side, trl_side, unweighted in zip(got, expected, plain):
        torch.testing.assert_close(ours_side, trl_side, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(trl_side, unweighted)  # the weighting changed something


# -- UPO: auxiliary rewards, the value head

class CountingReward:
    """A GRPO-style reward function that records how it is called."""

    __name__ = "counting"

    def __init__(self):
        self.calls, self.seen = 0, []

    def __call__(self, prompts, completions, **columns):
        self.calls += 1
        assert len(columns["topic"]) == len(prompts)  # the dataset's other columns come along
        self.seen += list(zip(prompts, completions))
        return [len(c.split()) / 10 for c in completions]


@pytest.fixture(scope="module")
def upo_run():
    reward = CountingReward()
    run = trl_tiny.run(UPOTrainer, UPOConfig, loss_type=["sigmoid", "upo"], upo_lambda=0.1, value_lr=1e-2,
                       trainer_kwargs=dict(aux_reward_funcs=["readability", reward],
                                           eval_dataset=trl_tiny.make_dataset(4, seed=5)))
    return run, reward


def test_upo_rewards_are_scored_once_per_example(upo_run):
    run, reward = upo_run
    rows = trl_tiny.make_rows(8)
    train_completions = [(p, c) for p, c in zip(rows["prompt"], rows["chosen"])]
    train_completions += [(p, r) for p, r in zip(rows["prompt"], rows["rejected"])]
    assert reward.calls == 2  # one batch of the train dataset, one of the eval dataset, none during the steps
    assert reward.seen[:16] == train_completions and len(reward.seen) == 16 + 8
    scores = run.trainer.train_dataset["aux_rewards_chosen"]
    assert len(scores) == 8 and all(len(row) == 2 for row in scores)
    assert scores[0][1] == pytest.approx(len(rows["chosen"][0].split()) / 10)


def test_upo_logs_aux_metrics_and_adds_the_upo_term(upo_run):
    run, _ = upo_run
    for key in ("aux/reward_chosen", "aux/reward_rejected", "aux/weight_mean", "aux/advantage_mean", "value/loss",
                "loss/sigmoid", "loss/upo", "rewards/margins", "logps/chosen", "num_tokens"):
        assert all(key in h for h in run.logs), key
    # step 1 (same parameters): the loss is DPO's plus the UPO term, and the sigmoid term is DPO's loss
    dpo_loss = dpo_run(("sigmoid",)).logs[0]["loss"]
    first = run.logs[0]
    assert first["loss/sigmoid"] == pytest.approx(dpo_loss, rel=1e-5)
    assert first["loss"] == pytest.approx(dpo_loss + first["loss/upo"], rel=1e-5)
    assert abs(first["loss/upo"]) > 1e-3
    evaluation = run.trainer.evaluate()
    assert "eval_aux/reward_chosen" in evaluation and "eval_rewards/margins" in evaluation


def test_value_head_trains_with_its_own_learning_rate(upo_run):
    run, _ = upo_run
    head = run.trainer._value_head
    groups = run.trainer.optimizer.param_groups
    value_groups = [g for g in groups if any(p is head.proj.weight for p in g["params"])]
    assert len(value_groups) == 1 and value_groups[0]["initial_lr"] == pytest.approx(1e-2)
    assert all(g["initial_lr"] == pytest.approx(1e-3) for g in groups if g is not value_groups[0])
    assert float(head.proj.weight.abs().sum()) > 0  # it starts at zero


def test_checkpoint_saves_the_value_head_and_resumes(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    settings = dict(loss_type=["sigmoid", "upo"], output_dir=str(tmp_path), save_strategy="steps", save_steps=2,
                    trainer_kwargs=dict(aux_reward_funcs=["readability", "length"]))
    full = trl_tiny.run(UPOTrainer, UPOConfig, **settings)
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / VALUE_HEAD_FILE).is_file()
    assert not [k for k in load_file(checkpoint / "model.safetensors") if "upo_value_head" in k]
    resumed = trl_tiny.run(UPOTrainer, UPOConfig, train=False, **settings)
    resumed.trainer.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.trainer.state.global_step == 3
    last = [h for h in resumed.trainer.state.log_history if "loss" in h][-1]
    assert last["loss"] == pytest.approx(full.logs[-1]["loss"], rel=1e-5)
    torch.testing.assert_close(resumed.trainer._value_head.proj.weight, full.trainer._value_head.proj.weight)
    final = tmp_path / "final"
    full.trainer.save_model(str(final))
    head = load_value_head(str(final))
    torch.testing.assert_close(head.proj.weight, full.trainer._value_head.proj.weight.cpu())
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    assert not hasattr(reloaded, "upo_value_head")


# -- errors before training starts

def _trainer(**overrides):
    kwargs = overrides.pop("trainer_kwargs", {})
    return trl_tiny.run(UPOTrainer, UPOConfig, train=False, trainer_kwargs=kwargs, **overrides)


def test_a_model_given_by_its_folder_trains_as_dpo_trainers_does(tmp_path):
    """``model="folder"`` as ``DPOTrainer`` takes it (TRL loads it, and reloads it as the reference)."""
    tokenizer = trl_tiny.make_tokenizer()
    trl_tiny.make_model(tokenizer).save_pretrained(tmp_path / "model")
    logs = {}
    for trainer_cls, config_cls in ((UPOTrainer, UPOConfig), (DPOTrainer, DPOConfig)):
        args = config_cls(**trl_tiny.trainer_args(loss_type=["sigmoid"], max_steps=2))
        trainer = trainer_cls(model=str(tmp_path / "model"), args=args, train_dataset=trl_tiny.make_dataset(),
                              processing_class=tokenizer)
        trainer.train()
        logs[trainer_cls] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logs[UPOTrainer]) == 2 and logs[UPOTrainer] == pytest.approx(logs[DPOTrainer], abs=1e-6)


def test_unknown_loss_name_is_refused():
    with pytest.raises(ValueError, match="loss_type 'nope' is neither a TRL 1.16 loss"):
        _trainer(loss_type=["sigmoid", "nope"])


@pytest.mark.parametrize("size", [{"cp_size": 2}, {"sp_size": 2, "sp_backend": "deepspeed"}, {"tp_size": 2}])
def test_parallelism_that_splits_sequences_or_the_model_is_refused(size):
    """accelerate's context / sequence / tensor parallelism would hand upo's loss parts of what it reads whole;
    refused by name before anything is prepared (FSDP's dp_shard_size is not)."""
    from accelerate.parallelism_config import ParallelismConfig

    name = next(iter(size))
    with pytest.raises(ValueError, match=f"parallelism_config {name}=2: not supported by UPOTrainer yet"):
        _trainer(parallelism_config=ParallelismConfig(**size))


def test_unknown_reward_name_is_refused():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        _trainer(loss_type=["sigmoid", "upo"], trainer_kwargs=dict(aux_reward_funcs=["readability", "nope"]))


@pytest.mark.parametrize("returned, message", [
    (lambda completions: [1.0] * (len(completions) - 1), "returned 15 values for 16 completions"),
    (lambda completions: [1.0] * 3 + [math.nan] * (len(completions) - 3), "returned nan for the chosen completion "
                                                                          "of example 3"),
])
def test_bad_reward_callable_is_refused_naming_it(returned, message):
    def my_reward(prompts, completions, **columns):
        return returned(completions)

    with pytest.raises(ValueError, match=f"aux reward 'my_reward' {message}"):
        _trainer(loss_type=["sigmoid", "upo"], trainer_kwargs=dict(aux_reward_funcs=[my_reward]))


def test_upo_without_rewards_and_rewards_without_upo_are_refused():
    with pytest.raises(ValueError, match="loss 'upo' needs auxiliary rewards"):
        _trainer(loss_type=["sigmoid", "upo"])
    with pytest.raises(ValueError, match="no loss of loss_type"):
        _trainer(loss_type=["sigmoid"], trainer_kwargs=dict(aux_reward_funcs=["readability"]))


def test_upo_option_errors_name_the_option():
    with pytest.raises(ValueError, match="expectile"):
        _trainer(loss_type=["sigmoid", "upo"], expectile=1.5, trainer_kwargs=dict(aux_reward_funcs=["length"]))
    with pytest.raises(ValueError, match="upo_lambda"):
        _trainer(loss_type=["sigmoid"], upo_lambda=0.5)


def test_omega_max_none_through_loss_options_removes_the_cap(tmp_path):
    """The omega_max field's None means upo's default (20.0); loss_options can still say None."""
    from upo.integrations.trl import UPOConfig
    from upo.integrations.trl.config import _options

    def config(**kw):
        return UPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "upo"], report_to="none", bf16=False,
                         use_cpu=True, **kw)

    assert "omega_max" not in _options(config(), ("sigmoid", "upo"), None)
    assert _options(config(omega_max=5.0), ("sigmoid", "upo"), None)["omega_max"] == 5.0
    options = _options(config(loss_options={"omega_max": None}), ("sigmoid", "upo"), None)
    assert "omega_max" in options and options["omega_max"] is None


# DPOConfig options that change TRL's numbers, and TRL 1.16's newer loss types: the same losses and updates.
TRL_OPTION_CASES = [dict(loss_type=["sigmoid"], use_weighting=True), dict(loss_type=["sigmoid"], ld_alpha=0.5),
                    dict(loss_type=["sigmoid"], f_divergence_type="js_divergence"),
                    dict(loss_type=["sigmoid"], label_smoothing=0.1), dict(loss_type=["sigmoid_norm"]),
                    dict(loss_type=["aot"]), dict(loss_type=["bco_pair"]),
                    # a reference unlike the policy: rewards far from 0, where a running-mean delta would show
                    dict(loss_type=["bco_pair"], ref_seed=1), dict(loss_type=["sigmoid"], ref_seed=1)]


@pytest.mark.parametrize("settings", TRL_OPTION_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_trl_options_match_dpo_trainer(settings):
    reference = trl_tiny.run(DPOTrainer, DPOConfig, max_steps=2, **settings)
    ours = trl_tiny.run(UPOTrainer, UPOConfig, max_steps=2, **settings)
    errors = relative_errors(reference.logs, ours.logs)
    assert errors[0] < 1e-5 and max(errors[1:]) < 1e-4, errors
    assert trl_tiny.update_ratio(reference, ours) < 0.01


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")
def test_two_processes_log_what_dpo_trainer_logs(tmp_path):
    """Under torchrun (2 processes, gloo): every logged number of sigmoid and ipo equals DPOTrainer's on the
    same run (the token statistics weighted by each rank's tokens, as TRL's), and UPO with its value head
    trains."""
    from train_helpers import subprocess_env

    out = tmp_path / "logs.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(REPO / "tests" / "trl_two_processes.py"), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = json.loads(out.read_text())
    for case in ("sigmoid", "ipo"):
        reference, ours = logs[f"{case}/dpo"], logs[f"{case}/upo"]
        assert len(reference) == len(ours) == 2
        for theirs, mine in zip(reference, ours):
            for key in set(theirs) - {"learning_rate", "epoch"}:
                # a reward is beta x a difference of fp32 sums of ~20 nats: one ulp of a sum is 2e-7 of it
                scale = max(abs(theirs[key]), 4e-3 if key.startswith("rewards/") else 1e-3)
                assert abs(mine[key] - theirs[key]) / scale < 1e-4, (case, key, theirs[key], mine[key])
    upo_logs = logs["sigmoid+upo/upo"]
    assert len(upo_logs) == 2 and all(math.isfinite(entry["loss"]) for entry in upo_logs)
    assert {"loss/upo", "aux/advantage_mean"} <= set(upo_logs[0])


def test_reward_specs_and_conversational_rows():
    rewards = AuxRewards(["readability", "length:-0.5", "column:score"])
    assert rewards.names == ["readability", "length", "column:score"]
    assert rewards.explicit_weights == [1.0, -0.5, 1.0]
    batch = {"prompt": [[{"role": "user", "content": "Say hi."}]],
             "chosen": [[{"role": "assistant", "content": "Hi there."}]],
             "rejected": [[{"role": "assistant", "content": "Salutations to you."}]],
             "score_chosen": [2.0], "score_rejected": [-1.0]}
    scored = rewards.score(batch, [0])
    assert scored["aux_rewards_chosen"][0][1:] == pytest.approx([0.02, 2.0])
    assert scored["aux_rewards_rejected"][0][1:] == pytest.approx([0.03, -1.0])


# -- packaging: no TRL in `import upo`, a clear error without TRL, the example

def test_without_trl_the_integration_says_what_to_install():
    code = "import sys; sys.modules['trl'] = None\ntry:\n    import upo.integrations.trl\nexcept ImportError as e:\n" \
           "    print(e)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert 'pip install "upo[trl]"' in result.stdout, result.stdout + result.stderr


def test_example_script_runs_offline(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("trl_upo_example", REPO / "examples" / "trl_upo.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # dataclasses look their module up
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)
    args = ["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--max_examples", "8", "--max_length", "128", "--report_to", "none", "--logging_steps", "1"]
    trainer = example.main(*example.make_parser().parse_args_and_config(args=args))
    out = tmp_path / "out"
    assert (out / VALUE_HEAD_FILE).is_file() and (out / "model.safetensors").is_file()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and "aux/reward_chosen" in logs[0] and math.isfinite(logs[-1]["loss"])
