"""upo-train on unpaired data (TRL's prompt/completion/label), KTO's mismatched pairs in the trainer, and
UPO's value head as its own learner (learning rate, checkpoints, the final model's value_head.safetensors)."""
import copy
import json

import pytest
import torch

from helpers import one_thread  # noqa: F401  (fixture used by pytestmark)
from train_helpers import (assert_one_line_error, make_trainer, micro_args, parameters, run_main, train_steps,
                           write_jsonl)
from upo.train.data import collate, default_dataset_path, eval_chunks, kl_keys
from upo.train.reference import sequences_logps

pytestmark = pytest.mark.usefixtures("one_thread")
TRL_KTO_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"}
UPO_METRICS = {"value/loss", "aux/advantage_mean", "aux/advantage_std", "aux/weight_mean", "aux/weight_max",
               "value/grad_norm", "value/lr"}


def unpaired_file(path, pairs: int = 12, chat: bool = False):
    """The shipped pairs unpaired as TRL's unpair_preference_dataset does (chosen: desirable), shuffled."""
    rows = []
    for line in default_dataset_path().read_text().splitlines()[:pairs]:
        pair = json.loads(line)
        for side, label in (("chosen", True), ("rejected", False)):
            if chat:
                rows.append({"prompt": [{"role": "user", "content": pair["prompt"]}],
                             "completion": [{"role": "assistant", "content": pair[side]}], "label": label})
            else:
                rows.append({"prompt": pair["prompt"], "completion": pair[side], "label": label})
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    return write_jsonl(path, [rows[i] for i in order])


def unpaired_trainer(tmp_path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = dict(dataset=unpaired_file(tmp_path / "unpaired.jsonl"), loss_type=["kto", "upo"], max_examples=None)
    settings.update(overrides)
    return make_trainer(tmp_path, **settings)


# ------------------------------------------------------------------ unpaired data end to end
@pytest.mark.parametrize("chat", [False, True], ids=["strings", "messages"])
def test_unpaired_kto_upo_trains_end_to_end(tmp_path, chat):
    trainer = unpaired_trainer(tmp_path, dataset=unpaired_file(tmp_path / "rows.jsonl", chat=chat), max_steps=3,
                               eval_fraction=0.25, eval_every=3)
    assert trainer.unpaired and trainer.module.value_head is not None
    summary = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    present = set().union(*records)
    assert TRL_KTO_METRICS | UPO_METRICS | {"loss/kto", "loss/upo"} <= present, sorted(present)
    assert "rewards/accuracies" not in present  # TRL's KTO logs none
    assert records[0]["kl"] == 0.0  # policy == reference at the first step (as TRL's)
    assert "eval/kl" in records[-1] and summary["eval"]
    from upo.value_head import load_value_head

    head = load_value_head(tmp_path / "out" / "model")
    for name, tensor in head.state_dict().items():
        assert torch.equal(tensor, trainer.module.value_head.state_dict()[name].cpu()), name


def test_unpaired_apo_zero_trains_without_mismatched_pairs(tmp_path):
    """TRL's KTOTrainer loss_type='apo_zero_unpaired': no reference point (no KL rows), the class weights apply."""
    trainer = unpaired_trainer(tmp_path, loss_type=["apo_zero_unpaired"], desirable_weight=1.5, max_steps=2)
    assert not trainer.mismatched and trainer.module.value_head is None
    assert trainer.module.loss_kwargs["desirable_weight"] == 1.5
    indices, _ = trainer.sampler.next_batch(trainer.state.position)
    labels = [trainer.data.examples[i].label for i in indices]
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and "kl" not in records[0]
    # policy == reference at step 1: a row's loss is its class weight times sig(0) = 1/2
    assert records[0]["loss"] == pytest.approx(sum(1.5 if d else 1.0 for d in labels) / 2 / len(labels), rel=1e-6)


def test_mismatched_rows_rotate_the_micro_batch_as_trl(tmp_path):
    trainer = unpaired_trainer(tmp_path)
    examples = [trainer.data.examples[i] for i in trainer.train_indices[:4]]
    batch = collate(examples, trainer.pad_id, packing=False, kl=True)
    for row, example in enumerate(examples):  # row i: prompt i, completion i - 1 (TRL's add_kl_completion_ids)
        length = int(batch.kl.attention_mask[row].sum())
        expected = example.prompt_ids + examples[row - 1].completion_ids
        assert batch.kl.input_ids[row, :length].tolist() == expected
    paired = make_trainer(tmp_path / "paired", loss_type=["kto"])
    pairs = [paired.data.examples[i] for i in paired.train_indices[:3]]
    _, keys = kl_keys(pairs, None)  # the 2B responses, chosen first, each after the prompt of the next row
    responses = [(e.index, side) for side in ("chosen", "rejected") for e in pairs]
    assert [(c, side) for _, c, side in keys] == [responses[k - 1] for k in range(6)]
    assert all(p != c for p, c, _ in keys)  # mismatched


def _mismatched_mean(trainer, indices):
    """The float64 mean of policy minus reference log-probs over the micro-batch's mismatched pairs."""
    seqs, _ = kl_keys([trainer.data.examples[i] for i in indices], trainer.config.max_length)
    policy, _, _ = sequences_logps(trainer.module.policy, seqs, trainer.pad_id, torch.device("cpu"), "torch")
    ref, _, _ = sequences_logps(trainer.module.reference, seqs, trainer.pad_id, torch.device("cpu"), "torch")
    return float((policy.double() - ref.double()).mean())


def test_evaluation_never_mismatches_an_example_with_itself():
    assert eval_chunks(list(range(9)), 4, True) == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    assert eval_chunks(list(range(9)), 4, False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert eval_chunks(list(range(6)), 4, True) == [[0, 1, 2, 3], [4, 5]]


@pytest.mark.parametrize("data", ["unpaired", "paired"])
def test_trainer_kl_is_the_clamped_mean_over_the_mismatched_pairs(tmp_path, data):
    trainer = (unpaired_trainer(tmp_path, lr=1e-2) if data == "unpaired"
               else make_trainer(tmp_path, loss_type=["kto"], lr=1e-2, max_examples=32))
    train_steps(trainer, 3)  # away from policy == reference, where the reference point is 0
    signs = set()
    for swap in (False, True):  # swapped: the trained model as the reference, so the mean changes sign
        if swap:
            trained = copy.deepcopy(trainer.module.policy).eval().requires_grad_(False)
            trainer.module.policy.load_state_dict(trainer.module.reference.state_dict())
            trainer.module.__dict__["reference"] = trained
        position = trainer.state.position
        for _ in range(3):
            indices, position = trainer.sampler.next_batch(position)
            expected = _mismatched_mean(trainer, indices)
            out = trainer.module(trainer.make_batch(indices))
            got = out.metrics["kl" if data == "unpaired" else "kto/kl"]
            assert got == pytest.approx(max(0.0, expected), rel=1e-4, abs=1e-5)
            signs.add(expected > 0)
    assert signs == {True, False}  # the mean itself and its clamp both checked


def test_precomputed_reference_of_unpaired_rows_and_mismatched_pairs_equals_on_the_fly(tmp_path):
    on_the_fly = unpaired_trainer(tmp_path / "a", eval_fraction=0.25)
    precomputed = unpaired_trainer(tmp_path / "b", eval_fraction=0.25, precompute_ref=True)
    assert precomputed.module.reference == "precomputed" and precomputed.ref_logps["kl"]
    for a, b in zip(train_steps(on_the_fly, 3), train_steps(precomputed, 3)):
        for key in ("loss", "kl", "rewards/chosen", "value/loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
    assert on_the_fly.evaluate()["loss"] == pytest.approx(precomputed.evaluate()["loss"], rel=1e-5)
    names = [p.name for p in (tmp_path / "b" / "out" / "ref_logps").glob("*.pt")]
    assert len(names) == 2 and sum(name.endswith("-kl.pt") for name in names) == 1, names


# ------------------------------------------------------------------ the value head as its own learner
def test_value_head_has_its_own_learning_rate_and_no_weight_decay(tmp_path):
    trainer = make_trainer(tmp_path, value_lr=0.05, lr=1e-4, weight_decay=0.1, lr_scheduler="constant")
    policy_group, value_group = trainer.optimizer.param_groups
    head = list(trainer.module.value_head.parameters())
    assert {id(p) for p in value_group["params"]} == {id(p) for p in head}
    assert value_group["lr"] == 0.05 and value_group["weight_decay"] == 0.0
    assert policy_group["lr"] == 1e-4 and policy_group["weight_decay"] == 0.1
    before = {name: p.detach().clone() for name, p in trainer.module.value_head.named_parameters()}
    metrics = trainer.train_step()
    assert metrics["value/lr"] == 0.05 and metrics["lr"] == 1e-4
    # Adam's first step moves every parameter with a gradient by the learning rate.
    bias_step = (trainer.module.value_head.proj.bias - before["proj.bias"]).abs().item()
    assert bias_step == pytest.approx(0.05, rel=1e-3)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a deprecated transformers property
def test_resume_restores_the_value_head_and_its_optimizer_state_exactly_with_lora(tmp_path):
    pytest.importorskip("peft")
    settings = dict(max_steps=4, lora=True, lora_r=4, lr=1e-2, lr_scheduler="constant", save_every=2)
    straight = unpaired_trainer(tmp_path / "a", **settings)
    straight.train()
    first = unpaired_trainer(tmp_path / "b", **settings)
    train_steps(first, 2)
    path = first.save_checkpoint()
    saved = torch.load(path, weights_only=False)
    assert {"value_head.proj.weight", "value_head.norm.weight"} <= set(saved["model"])
    assert len(saved["optimizer"]["param_groups"]) == 2
    first.close()
    resumed = unpaired_trainer(tmp_path / "b", resume="auto", **settings)
    resumed.train()
    expected, actual = parameters(straight), parameters(resumed)
    for name in [n for n in expected if n.startswith("value_head.") or "lora_" in n]:
        assert torch.equal(expected[name], actual[name]), name
    assert (tmp_path / "b" / "out" / "model" / "value_head.safetensors").is_file()


# ------------------------------------------------------------------ user mistakes: one line, exit 2
@pytest.mark.parametrize("extra, fragments", [
    (["--loss-type", "sigmoid"], ["--loss-type sigmoid compares the two responses of a pair", "unpaired"]),
    (["--loss-type", "kto", "upo", "--baseline", "pair_mean"], ["--baseline pair_mean needs pairs"]),
    (["--loss-type", "kto", "--label-smoothing", "0.1"], ["--label-smoothing applies to pairs"]),
    (["--loss-type", "kto", "--batch-size", "1"], ["KTO's reference point needs mismatched", "--batch-size 1"]),
])
def test_unpaired_mistakes_are_one_line(tmp_path, capsys, extra, fragments):
    data = unpaired_file(tmp_path / "rows.jsonl", pairs=4)
    code, _, err = run_main(micro_args(tmp_path, "--dataset", data, *extra), capsys)
    assert_one_line_error(code, err, *fragments)


@pytest.mark.parametrize("label", ["yes", 2, None])
def test_labels_must_be_bool_like(tmp_path, capsys, label):
    rows = [{"prompt": "p", "completion": "c", "label": True}] * 3
    rows.append({"prompt": "p", "completion": "d", "label": label})
    code, _, err = run_main(micro_args(tmp_path, "--dataset", write_jsonl(tmp_path / "d.jsonl", rows), "--loss-type",
                                       "kto"), capsys)
    assert_one_line_error(code, err, "d.jsonl line 4", "'label' must be true (desirable) or false")


def test_formats_do_not_mix_and_settings_need_their_loss(tmp_path, capsys):
    data = unpaired_file(tmp_path / "rows.jsonl", pairs=4)
    code, _, err = run_main(micro_args(tmp_path, "--dataset", data, "--eval-dataset", str(default_dataset_path()),
                                       "--loss-type", "kto"), capsys)
    assert_one_line_error(code, err, "held-out rows are paired", "training rows are unpaired")
    code, _, err = run_main(micro_args(tmp_path, "--loss-type", "sigmoid", "--desirable-weight", "2"), capsys)
    assert_one_line_error(code, err, "--desirable-weight only applies with 'kto'")
    code, _, err = run_main(micro_args(tmp_path, "--loss-type", "sigmoid", "--value-lr", "0.1"), capsys)
    assert_one_line_error(code, err, "--value-lr only applies with 'upo'")
    code, _, err = run_main(micro_args(tmp_path, "--omega-max", "many"), capsys)
    assert_one_line_error(code, err, "--omega-max", "'many'")


def test_omega_max_none_and_class_weights_reach_the_loss(tmp_path):
    trainer = unpaired_trainer(tmp_path, omega_max=None, desirable_weight=1.5, undesirable_weight=0.5)
    kwargs = trainer.module.loss_kwargs
    assert kwargs["omega_max"] is None and kwargs["desirable_weight"] == 1.5 and kwargs["undesirable_weight"] == 0.5
    assert "label_smoothing" not in kwargs
    from upo.train.cli import parse_config

    assert parse_config(["--omega-max", "none"]).omega_max is None


# ------------------------------------------------------------------ two processes
@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")
def test_unpaired_kto_under_torchrun(tmp_path):
    """Two ranks: one reference point for both (all-reduced), metrics merged even when one rank's micro-batch
    lacks a class (its rewards/rejected absent)."""
    from train_helpers import MICRO, metrics_rows, run_upo_train

    data = unpaired_file(tmp_path / "rows.jsonl", pairs=8)
    args = ["--model-config", MICRO, "--dataset", data, "--loss-type", "kto", "upo", "--batch-size", "4",
            "--max-steps", "4", "--lr", "1e-2", "--eval-fraction", "0.25", "--eval-every", "2", "--backend", "torch",
            "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / "out")]
    result = run_upo_train(args, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_rows(tmp_path / "out")
    assert len(rows) == 4 and all({"kl", "value/loss", "rewards/chosen"} <= set(row) for row in rows)
    assert "eval/kl" in rows[1] and (tmp_path / "out" / "model" / "value_head.safetensors").is_file()
