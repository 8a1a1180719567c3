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
from upo.train.objective import loss_kwargs_from_config
from upo.train.preference_model import PreferenceModel

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
    "fp32-triton": dict(backend="triton"),
}


def assert_exact_first_step(record):
    assert record["rewards/chosen"] == 0.0 and record["rewards/rejected"] == 0.0, record
    assert record["rewards/margins"] == 0.0 and record["loss"] == LOG_2, record


@pytest.mark.parametrize("settings", CONFIGS.values(), ids=CONFIGS.keys())
def test_first_step_is_exact(tmp_path, settings):
    trainer = make_trainer(tmp_path, loss_type=["sigmoid"], max_steps=1, **settings)
    logps = trainer.sequence_logps(list(range(8)))  # evaluation's sums: the same numbers
    for side in ("chosen", "rejected"):
        assert torch.equal(logps["policy"][side][:8], logps["reference"][side][:8]), side
    assert_exact_first_step(train_steps(trainer, 1)[0])


def test_kto_first_step_is_exact_in_bf16(tmp_path):
    """KTO on unpaired rows: the reference point from mismatched pairs is exactly 0 too."""
    for name, settings in (("on-the-fly", {}), ("precomputed", dict(precompute_ref=True))):
        record = train_steps(unpaired_trainer(tmp_path / name, precision="bf16", max_steps=1, **settings), 1)[0]
        assert record["kl"] == 0.0 and record["rewards/chosen"] == 0.0 and record["rewards/rejected"] == 0.0, record


def test_packed_precomputed_reference_is_within_attention_rounding(tmp_path):
    """The one combination that is not bit-exact (docs/training.md): the cache packs other neighbours than
    the training batch, and bf16 attention over a packed row depends on its pack. Bounded here."""
    trainer = make_trainer(tmp_path, loss_type=["sigmoid"], precision="bf16", packing=True, precompute_ref=True)
    record = train_steps(trainer, 1)[0]
    beta = trainer.config.beta
    assert max(abs(record["rewards/chosen"]), abs(record["rewards/rejected"])) <= 2e-3 * beta, record


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

    def without_autocast(self, batch, policy_head):
        with autocast(enabled=False):
            return original(self, batch, policy_head)

    monkeypatch.setattr(PreferenceModel, "_reference_kwargs", without_autocast)
    record = train_steps(make_trainer(tmp_path, loss_type=["sigmoid"], precision="bf16", max_steps=1), 1)[0]
    with pytest.raises(AssertionError):
        assert_exact_first_step(record)
