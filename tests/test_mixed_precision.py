"""One numerical path for a log-prob, in fp32, bf16 autocast and bf16 weights (docs/kernels.md, "Mixed
precision"): the kernels' log-probs do not depend on the statistics asked or on autocast's ``mm``, and in
``upo-train`` the policy inside the loss, the reference (a frozen copy, LoRA's adapters off, the precomputed
cache), evaluation and KTO's mismatched pairs give bit-identical sums for identical weights, so at step 1,
where the policy is the reference, every implicit reward is exactly 0 and the sigmoid loss is log 2."""
import math

import pytest
import torch

import upo
from conftest import requires_cuda
from helpers import one_thread  # noqa: F401  (fixture used by pytestmark)
from test_train_unpaired import unpaired_trainer
from train_helpers import make_trainer, micro_config, train_steps
from upo.losses.registry import _REGISTRY
from upo.train.data import DataPosition, PairSampler, eval_chunks
from upo.train.kto_pairs import visited_batches
from upo.train.objective import loss_kwargs_from_config
from upo.train.preference_model import PreferenceModel
from upo.train.reference import reference_batches, rows_logps

pytestmark = pytest.mark.usefixtures("one_thread")
LOG_2 = torch.tensor(math.log(2)).item()  # fp32's log 2, what an fp32 loss of exactly sigmoid(0) reads
STATS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def head_inputs(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 9, 32, generator=generator).to(dtype)
    weight = (0.3 * torch.randn(300, 32, generator=generator)).to(dtype)
    labels = torch.randint(0, 300, (4, 9), generator=generator)
    labels[:, :3] = -100
    return hidden, weight, labels


def autocast(enabled=True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


# -- the kernels: one path whatever is asked

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_log_probs_do_not_depend_on_the_statistics_asked(backend, dtype):
    # The policy's sums come with TRL's token statistics, the reference's without.
    hidden, weight, labels = head_inputs(dtype)
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the interpreter cannot run the fused forward's bf16 tl.dot (docs/kernels.md)")
    plain = upo.sequence_logprobs(hidden, weight, labels, backend=backend)[0]
    with_stats = upo.sequence_logprobs(hidden, weight, labels, backend=backend, stats=STATS)[0]
    assert torch.equal(plain, with_stats)


def test_autocast_is_the_operands_cast_to_its_dtype():
    """Under autocast the kernels get what the model's own head would multiply (hidden and weight in bf16),
    accumulate in fp32, and the statistics asked change nothing; gradients reach the fp32 leaves."""
    hidden, weight, labels = head_inputs()
    hidden.requires_grad_(True)
    with autocast():
        under = upo.sequence_logprobs(hidden, weight, labels, backend="torch")[0]
        with_stats = upo.sequence_logprobs(hidden, weight, labels, backend="torch", stats=STATS)[0]
    cast = upo.sequence_logprobs(hidden.bfloat16(), weight.bfloat16(), labels, backend="torch")[0]
    assert torch.equal(under, cast) and torch.equal(under, with_stats)
    assert under.dtype == torch.float32
    (grad,) = torch.autograd.grad(under.sum(), hidden)
    (grad_cast,) = torch.autograd.grad(cast.sum(), hidden)
    assert grad.dtype == torch.float32 and torch.equal(grad, grad_cast)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("fwd_impl", ["fused", "cublas"])
def test_one_path_on_cuda(monkeypatch, fwd_impl):
    """The same on a GPU, both Triton forwards and the torch backend: autocast is the operands cast to
    bf16, and the statistics asked change nothing."""
    monkeypatch.setenv("UPO_FWD_IMPL", fwd_impl)
    hidden, weight, labels = (t.cuda() for t in head_inputs())
    for backend in ("triton", "torch"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            under = upo.sequence_logprobs(hidden, weight, labels, backend=backend)[0]
            with_stats = upo.sequence_logprobs(hidden, weight, labels, backend=backend, stats=STATS)[0]
        cast = upo.sequence_logprobs(hidden.bfloat16(), weight.bfloat16(), labels, backend=backend)[0]
        assert torch.equal(under, cast) and torch.equal(under, with_stats), backend


# -- upo-train: step 1, policy == reference

CONFIGS = {
    "bf16": dict(precision="bf16"),
    "bf16-precompute": dict(precision="bf16", precompute_ref=True),
    "bf16-lora": dict(precision="bf16", lora=True, lora_r=4),
    "bf16-packing": dict(precision="bf16", packing=True),
    "bf16-share-prompt": dict(precision="bf16", share_prompt=True, gradient_checkpointing=True),
    "bf16-weights": dict(model_dtype="bf16"),
    "bf16-weights-autocast-precompute": dict(model_dtype="bf16", precision="bf16", precompute_ref=True),
    "fp16-weights-lora": dict(model_dtype="fp16", lora=True, lora_r=4),
    "fp32-triton": dict(backend="triton", batch_size=2),  # the interpreter: 2 pairs (4 took 2 min, 2026-12-08)
}


def assert_exact_first_step(record):
    assert record["rewards/chosen"] == 0.0 and record["rewards/rejected"] == 0.0, record
    assert record["rewards/margins"] == 0.0 and record["loss"] == LOG_2, record


@pytest.mark.parametrize("settings", CONFIGS.values(), ids=CONFIGS.keys())
def test_first_step_is_exact(tmp_path, settings):
    trainer = make_trainer(tmp_path, loss_type=["sigmoid"], max_steps=1, **settings)
    pairs = 2 * trainer.config.batch_size
    logps = trainer.sequence_logps(list(range(pairs)))  # evaluation's sums: the same numbers
    for side in ("chosen", "rejected"):
        assert torch.equal(logps["policy"][side][:pairs], logps["reference"][side][:pairs]), side
    assert_exact_first_step(train_steps(trainer, 1)[0])


def test_kto_first_step_is_exact_in_bf16(tmp_path):
    """KTO on unpaired rows: the reference point from mismatched pairs is exactly 0 too."""
    for name, settings in (("on-the-fly", {}), ("precomputed", dict(precompute_ref=True))):
        record = train_steps(unpaired_trainer(tmp_path / name, precision="bf16", max_steps=1, **settings), 1)[0]
        assert record["kl"] == 0.0 and record["rewards/chosen"] == 0.0 and record["rewards/rejected"] == 0.0, record


def test_kto_precomputed_reference_point_is_exact_in_every_visited_batch(tmp_path):
    """Unpaired rows on the tiny Llama (model_config None), whose bf16 forward depends on the batch: the cached
    mismatched rows of every micro-batch the run visits, and of evaluation, are computed together as the batch
    holds them, so KTO's reference point is exactly 0 in each (cached 8 rows at a time, two batches' worth, one
    batch read 6.1e-5)."""
    trainer = unpaired_trainer(tmp_path, precision="bf16", precompute_ref=True, max_steps=6, eval_fraction=0.25,
                               model_config=None)
    for indices in visited_batches(trainer.sampler, 6, 1) + eval_chunks(trainer.eval_indices, 4, True):
        with torch.no_grad():
            assert float(trainer.module(trainer.make_batch(indices)).metrics["kl"]) == 0.0, indices


# -- --precompute-ref: each pair computed in the micro-batch training gives it (upo/train/reference.py)

PRECOMPUTED_LAYOUTS = {"padded": {}, "packed": dict(packing=True), "share-prompt": dict(share_prompt=True),
                       "ld-alpha": dict(ld_alpha=0.5)}


def precomputed_trainer(tmp_path, **settings):
    """bf16, 4 pairs of unequal lengths a batch, 5 held out; the built-in tiny Llama (model_config None), whose bf16
    forward depends on the batch a row sits in, where the micro model's happens not to on these pairs."""
    return make_trainer(tmp_path, loss_type=["sigmoid"], precision="bf16", precompute_ref=True, max_examples=20,
                        eval_fraction=0.25, model_config=None, **settings)


@pytest.mark.parametrize("settings", PRECOMPUTED_LAYOUTS.values(), ids=PRECOMPUTED_LAYOUTS.keys())
def test_precomputed_reference_is_exact_in_every_batch_of_the_first_epoch(tmp_path, settings):
    """With the policy as the reference, every micro-batch of the first epoch and of evaluation has implicit
    rewards exactly 0 and each pair's sigmoid loss log 2. (Computed in the data's order, in other batches,
    the cache left step 1 of this run 7.6e-7 off.)"""
    trainer = precomputed_trainer(tmp_path, **settings)
    batches = trainer.sampler.epoch_batches(0) + eval_chunks(trainer.eval_indices, 4, False)
    for indices in batches:
        with torch.no_grad():
            out = trainer.module(trainer.make_batch(indices))
        rewards = (float(out.metrics["rewards/chosen"]), float(out.metrics["rewards/rejected"]))
        assert rewards == (0.0, 0.0), (indices, rewards)
        assert torch.equal(out.losses, torch.full_like(out.losses, LOG_2)), (indices, out.losses)


@pytest.mark.parametrize("settings", [{}, dict(packing=True)], ids=["padded", "packed"])
def test_precomputed_reference_in_a_later_epoch_is_within_attention_rounding(tmp_path, settings):
    """A later epoch puts the pairs in other batches and reads the first epoch's values (docs/training.md): each
    pair's cached sum is within 1e-5 of the one its new batch gives, relative (measured: 1.5e-7 padded, 1.8e-6
    packed, where bf16 attention over a packed row depends on the whole pack)."""
    trainer = precomputed_trainer(tmp_path, **settings)
    for indices in trainer.sampler.epoch_batches(1):
        batch = trainer.make_batch(indices)
        policy, _, _ = rows_logps(trainer.module.policy, batch, "torch", torch.bfloat16)
        cached = torch.cat([batch.ref_chosen_logps, batch.ref_rejected_logps])
        assert ((policy - cached).abs() <= 1e-5 * cached.abs()).all(), (indices, policy - cached)


def test_reference_batches_are_every_ranks_micro_batches_of_the_first_epoch():
    """Two ranks, 21 training pairs in global batches of 4 (one left over), 3 held out, 2 in neither split: the
    cache's batches are what each rank's loop builds in the first epoch, in order, then evaluation's, then the
    rest in micro-batches of one rank's size; every example once."""
    samplers = [PairSampler(list(range(3, 24)), 4, seed=5, rank=rank, world_size=2) for rank in range(2)]
    batches = reference_batches(samplers[0], [0, 1, 2], mismatched=False, num_examples=26)
    built, position = [], DataPosition()
    for _ in range(samplers[0].batches_per_epoch):
        built += [sampler.next_batch(position)[0] for sampler in samplers]
        position = samplers[0].next_batch(position)[1]
    assert batches[:len(built)] == built and batches[len(built)] == [0, 1, 2]
    assert all(len(rest) <= 2 for rest in batches[len(built) + 1:])
    assert sorted(i for batch in batches for i in batch) == list(range(26))


@pytest.mark.parametrize("settings", [dict(precision="bf16"), dict(precision="bf16", precompute_ref=True)],
                         ids=["on-the-fly", "precomputed"])
def test_every_loss_types_implicit_rewards_are_zero_at_step_1(tmp_path, settings):
    trainer = make_trainer(tmp_path, loss_type=["sigmoid"], **settings)
    batch = trainer.make_batch(list(range(4)))
    names = sorted({spec.name for spec in _REGISTRY.values() if spec.needs_reference} - {"mrpo"})  # mrpo: 2 refs
    for name in names:
        extra = dict(label_smoothing=1e-3) if name == "exo_pair" else {}
        trainer.module.loss_kwargs = loss_kwargs_from_config(micro_config(tmp_path, loss_type=[name], **extra), None)
        with torch.no_grad():
            metrics = trainer.module(batch).metrics
        rewards = {key: value for key, value in metrics.items() if key.startswith("rewards/")}
        assert rewards and all(float(value) == 0.0 for value in rewards.values()), (name, rewards)


def test_a_reference_without_autocast_is_caught(tmp_path, monkeypatch):
    """The planted fault these tests exist for: the reference's hidden states computed without the autocast
    the policy has. Step 1 is then no longer exact."""
    original = PreferenceModel._reference_kwargs

    def without_autocast(self, *args):
        with autocast(enabled=False):
            return original(self, *args)

    monkeypatch.setattr(PreferenceModel, "_reference_kwargs", without_autocast)
    record = train_steps(make_trainer(tmp_path, loss_type=["sigmoid"], precision="bf16", max_steps=1), 1)[0]
    with pytest.raises(AssertionError):
        assert_exact_first_step(record)
