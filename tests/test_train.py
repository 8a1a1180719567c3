"""upo.train.trainer end to end on a micro Llama (hidden 32, 2 layers): learning, UPO, resume, packing, reference."""
import json
import random

import pytest
import torch

from helpers import one_thread  # noqa: F401  (fixture used by pytestmark)
from train_helpers import make_trainer, parameters, train_steps
from upo.rewards import readability
from upo.train.data import default_dataset_path
from upo.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def swapped_preferences(path, n: int, seed: int = 0):
    """Shipped pairs with chosen/rejected swapped at random: preference says nothing about readability."""
    rows = [json.loads(line) for line in default_dataset_path().read_text().splitlines()[:n]]
    rng = random.Random(seed)
    for row in rows:
        if rng.random() < 0.5:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


# ------------------------------------------------------------------ learning
@pytest.mark.slow
def test_training_learns_the_preferences(tmp_path):
    trainer = make_trainer(tmp_path, max_examples=24, batch_size=8, max_steps=30, lr=2e-3, eval_fraction=0.25,
                           eval_every=10, save_every=15)
    before = trainer.evaluate(trainer.train_indices)
    summary = trainer.train()
    after = trainer.evaluate(trainer.train_indices)
    assert after["loss"] < before["loss"]
    assert summary["train"]["loss"] < summary["first_loss"]
    assert after["rewards/accuracies"] > 0.9

    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31))
    for key in ("loss", "loss/sigmoid", "loss/upo", "rewards/margins", "rewards/accuracies", "aux/reward_chosen",
                "aux/advantage_mean", "aux/readability/chosen", "value/loss", "lr", "tokens_per_s",
                "peak_memory_bytes"):
        assert key in lines[0], key
    assert "eval/rewards/accuracies" in lines[9] and "eval/loss" not in lines[8]
    assert -1.0 <= lines[-1]["eval/aux/implicit_reward_corr"] <= 1.0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["steps"] == 30 and saved["train_pairs"] == 18 and saved["eval_pairs"] == 6
    assert (out / "plot.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000015.pt", "checkpoint-000030.pt"]
    assert (out / "model" / "config.json").is_file()


def _implicit_reward_vs_readability(trainer: Trainer, rows) -> float:
    """Pearson correlation, over every training response, of the per-token implicit reward
    ``(S - R) / n`` with the response's readability (length-normalised so that the longer,
    convoluted responses do not win just by having more tokens)."""
    logps = trainer.sequence_logps(trainer.train_indices)
    policy, reference = logps["policy"], logps["reference"]
    implicit, aux = [], []
    for i in trainer.train_indices:
        for side in ("chosen", "rejected"):
            implicit.append(float((policy[side][i] - reference[side][i]) / policy[f"{side}_tokens"][i]))
            aux.append(readability("", rows[i][side]))
    return float(torch.corrcoef(torch.tensor([implicit, aux]))[0, 1])


@pytest.mark.slow
def test_upo_raises_the_implicit_reward_of_readable_responses(tmp_path):
    # With preferences decorrelated from readability, only the auxiliary objective can make the
    # policy's implicit reward track readability.
    rows = swapped_preferences(tmp_path / "swapped.jsonl", 48)
    common = dict(dataset=str(tmp_path / "swapped.jsonl"), max_examples=48, batch_size=8, max_steps=30,
                  lr=2e-3)
    correlations = {}
    for name, loss_type in (("off", ["sigmoid"]), ("on", ["sigmoid", "upo"])):
        rewards = dict(aux_reward=["readability:1.0"]) if "upo" in loss_type else {}
        trainer = make_trainer(tmp_path / name, loss_type=loss_type, **common, **rewards)
        train_steps(trainer, 30)
        correlations[name] = _implicit_reward_vs_readability(trainer, rows)
    # The trainer's own eval metric measures the same thing.
    assert trainer.implicit_reward_correlation(trainer.train_indices) == pytest.approx(correlations["on"], abs=1e-4)
    assert correlations["on"] > 0.6, correlations
    assert correlations["on"] > correlations["off"] + 0.3, correlations


# ------------------------------------------------------------------ resume
def test_resume_continues_bit_for_bit(tmp_path):
    settings = dict(max_steps=6, lr_scheduler="constant", warmup_steps=2, save_every=3)
    straight = make_trainer(tmp_path / "a", **settings)
    straight.train()

    first = make_trainer(tmp_path / "b", **settings)
    train_steps(first, 3)
    first.save_checkpoint()
    first.close()  # the output dir's lock: a Trainer holds it until train() ends or close()
    resumed = make_trainer(tmp_path / "b", resume="auto", **settings)
    assert resumed.state.step == 3
    resumed.train()

    expected, actual = parameters(straight), parameters(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    lines = (tmp_path / "b" / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [4, 5, 6]  # steps 1-3 were not logged by main()


def test_resume_drops_metrics_of_lost_steps(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, save_every=2, keep_checkpoints=5)
    trainer.train()
    checkpoints = sorted((tmp_path / "out" / "checkpoints").glob("checkpoint-*.pt"))
    assert [p.name for p in checkpoints] == ["checkpoint-000002.pt", "checkpoint-000004.pt"]
    assert not list((tmp_path / "out" / "checkpoints").glob(".*tmp*"))  # atomic writes leave no temp file
    resumed = make_trainer(tmp_path, max_steps=4, resume=str(checkpoints[0]))
    assert resumed.state.step == 2
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


# ------------------------------------------------------------------ packing
def _loss_and_grads(trainer: Trainer, packing: bool):
    trainer.module.zero_grad(set_to_none=True)
    examples = [trainer.data.examples[i] for i in trainer.train_indices[:4]]
    from upo.train.data import collate

    batch = collate(examples, trainer.pad_id, packing=packing)
    out = trainer.module(batch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.module.named_parameters() if p.grad is not None}
    return out, grads


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(tmp_path):
    trainer = make_trainer(tmp_path)
    train_steps(trainer, 2)  # away from the initial point, where policy == reference
    padded, padded_grads = _loss_and_grads(trainer, packing=False)
    packed, packed_grads = _loss_and_grads(trainer, packing=True)
    assert torch.allclose(packed.loss, padded.loss, rtol=1e-5, atol=1e-5)
    for name in padded.terms:
        assert torch.allclose(packed.terms[name], padded.terms[name], rtol=1e-5, atol=1e-5), name
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_packed_training_runs(tmp_path):
    metrics = train_steps(make_trainer(tmp_path, packing=True), 2)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


# ------------------------------------------------------------------ reference
def test_precomputed_reference_equals_on_the_fly(tmp_path):
    on_the_fly = make_trainer(tmp_path / "a")
    precomputed = make_trainer(tmp_path / "b", precompute_ref=True)
    cache = list((tmp_path / "b" / "out" / "ref_logps").glob("*.pt"))
    assert len(cache) == 1
    indices = on_the_fly.train_indices
    fresh = on_the_fly.sequence_logps(indices)["reference"]
    for side in ("chosen", "rejected"):
        assert torch.allclose(precomputed.ref_logps[side][indices], fresh[side][indices], rtol=1e-5, atol=1e-4)
    # Same training trajectory with either reference.
    a, b = train_steps(on_the_fly, 2), train_steps(precomputed, 2)
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-5)
    # A second run with the same model, data and lengths reuses the cache.
    before = cache[0].stat().st_mtime_ns
    precomputed.close()
    again = make_trainer(tmp_path / "b", precompute_ref=True)
    assert cache[0].stat().st_mtime_ns == before
    assert torch.equal(again.ref_logps["chosen"], precomputed.ref_logps["chosen"])
    # Other length settings give another cache entry.
    again.close()
    make_trainer(tmp_path / "b", precompute_ref=True, max_length=96).close()
    assert len(list((tmp_path / "b" / "out" / "ref_logps").glob("*.pt"))) == 2


def test_precomputed_reference_serves_ld_dpo(tmp_path):
    """--ld-alpha with --precompute-ref: the cache holds the reference's shared-prefix sums too, and the
    run equals the one with the reference model on the fly; a cache without them is recomputed."""
    settings = dict(loss_type=["sigmoid"], ld_alpha=0.5)
    plain_cache = make_trainer(tmp_path / "b", precompute_ref=True, loss_type=["sigmoid"])
    assert "chosen_shared" not in plain_cache.ref_logps
    plain_cache.close()
    on_the_fly = make_trainer(tmp_path / "a", **settings)
    precomputed = make_trainer(tmp_path / "b", precompute_ref=True, overwrite=True, **settings)
    assert {"chosen_shared", "rejected_shared"} <= set(precomputed.ref_logps)
    a, b = train_steps(on_the_fly, 2), train_steps(precomputed, 2)
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-5)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], rel=1e-4, abs=1e-5)


def test_reference_free_losses_need_no_reference(tmp_path):
    trainer = make_trainer(tmp_path, loss_type=["simpo"], precompute_ref=True)
    assert trainer.module.reference is None and trainer.ref_logps is None
    assert torch.isfinite(torch.tensor(train_steps(trainer, 1)[0]["loss"]))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a deprecated transformers property
def test_lora_trains_only_adapters_and_uses_the_disabled_adapters_as_reference(tmp_path):
    pytest.importorskip("peft")
    trainer = make_trainer(tmp_path, lora=True, lora_r=4, loss_type=["sigmoid"], lr=1e-2)
    trained = [name for name, p in trainer.module.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained)
    frozen = {name: p.detach().clone() for name, p in trainer.module.named_parameters() if not p.requires_grad}
    first = trainer.train_step()
    # LoRA B starts at zero: policy == reference, so every implicit reward is 0 at step 1.
    assert first["rewards/margins"] == 0.0 and first["loss"] == pytest.approx(0.6931, abs=1e-4)
    second = trainer.train_step()
    assert second["rewards/margins"] != 0.0
    for name, p in trainer.module.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_bf16_gradient_checkpointing_rmsprop_and_accumulation(tmp_path):
    trainer = make_trainer(tmp_path, precision="bf16", gradient_checkpointing=True, optimizer="rmsprop",
                           grad_accum=2, batch_size=2)
    metrics = train_steps(trainer, 2)
    assert trainer.state.position.index == 8  # 2 steps x 2 micro-batches x 2 pairs
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


def test_baselines_without_value_head(tmp_path):
    for baseline in ("pair_mean", "batch_mean"):
        trainer = make_trainer(tmp_path / baseline, baseline=baseline)
        assert trainer.module.value_head is None
        assert "value/loss" in train_steps(trainer, 1)[0]
