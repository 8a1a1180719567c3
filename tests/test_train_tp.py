"""``upo-train --tp N`` (tensor parallelism) on CPU processes (torchrun, gloo).

The micro Llama keeps the byte tokenizer's 259-entry vocabulary, a prime: the LM head's shards are
uneven for 2 and 3 ranks (130 + 129, 87 + 87 + 85 rows). ``--tp 2`` shards its decoder by the
transformers plan (2 heads); ``--tp 3`` cannot (2 heads) and replicates it. Both must train exactly
as one process does on the same data; the data-parallel composition (dp x tp) is checked on a
2 x 2 mesh of bare processes (four full trainer processes cost too much CI time on two cores).
"""
import contextlib
import io
import math
import re
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from helpers import MICRO_MODEL
from train_helpers import (MICRO, assert_one_line_error, assert_same_tensors, checkpoint, metrics_rows,
                           micro_args, run_main, run_upo_train, without_timing)
from upo.train.cli import main

STEPS = 3
VOCAB, HIDDEN = 259, MICRO_MODEL["hidden_size"]
ARGS = ["--model-config", MICRO, "--max-examples", "16", "--batch-size", "4", "--max-steps", str(STEPS),
        "--eval-fraction", "0.25", "--eval-every", "2", "--save-every", "2", "--backend", "torch", "--device", "cpu",
        "--no-progress"]


def torchrun(test):
    """The module's runs are shared: one xdist worker runs every test that reads them (pytest.ini)."""
    return pytest.mark.slow(pytest.mark.xdist_group("torchrun")(test))


def train(output_dir, processes: int, *extra: str) -> str:
    """A run to the end (one process: in this process, which has transformers loaded already); its stderr."""
    args = [*ARGS, "--output-dir", str(output_dir), *extra]
    if processes == 1:
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            assert main(args) == 0, errors.getvalue()[-3000:]
        return errors.getvalue()
    result = run_upo_train(args, processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


class Runs(dict):
    """One process, ``--tp 2`` on 2 processes, ``--tp 3`` on 3: each run (output dir, stderr) made when first read."""

    SETTINGS = {"single": (1, ()), "tp2": (2, ("--tp", "2")), "tp3": (3, ("--tp", "3"))}

    def __init__(self, factory):
        super().__init__()
        self.factory = factory

    def __missing__(self, name):
        processes, extra = self.SETTINGS[name]
        out = self.factory.mktemp(name)
        self[name] = (out, train(out, processes, *extra))
        return self[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory)


@torchrun
@pytest.mark.parametrize("name", ["tp2", "tp3"])
def test_tp_trains_as_one_process(runs, name):
    (single, _), (parallel, _) = runs["single"], runs[name]
    one, many = metrics_rows(single), metrics_rows(parallel)
    assert [r["step"] for r in many] == list(range(1, STEPS + 1))
    for a, b in zip(one, many):
        for key in ("loss", "grad_norm", "logps/chosen", "rewards/margins", "value/loss"):
            # margins are beta x a difference of four sums of ~100 nats, each as close as logps/chosen (rel
            # 1e-5): past step 1 a sharded decoder's reduction order leaves them 1.5e-6 apart (tp2, measured)
            floor = 1e-5 if key == "rewards/margins" else 1e-6
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=floor), (name, a["step"], key)
        assert b["tokens"] == a["tokens"], name  # a model copy's ranks share one batch: counted once
        if "eval/loss" in a:
            assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-5), name
    # The checkpoint holds the gathered (whole) tensors, named as without --tp.
    expected, gathered = checkpoint(single, STEPS)["model"], checkpoint(parallel, STEPS)["model"]
    assert expected.keys() == gathered.keys()
    for key, tensor in expected.items():
        assert not hasattr(gathered[key], "placements") and gathered[key].shape == tensor.shape, key
        assert torch.allclose(gathered[key], tensor, rtol=0, atol=1e-5), (name, key)
    summary = (parallel / "summary.json").read_text()
    assert '"world_size": ' + name[-1] in summary


def _head_note(stderr: str, tp: int) -> re.Match:
    match = re.search(rf"--tp {tp}: LM head sharded over the vocabulary \((\d+) of (\d+) rows on this rank\), "
                      r"decoder (sharded|replicated)", stderr)
    assert match, stderr[-3000:]
    return match


@torchrun
@pytest.mark.parametrize("tp, decoder", [(2, "sharded"), (3, "replicated")])
def test_each_rank_holds_its_share_of_the_head(runs, tp, decoder):
    """Rank 0's shard of the head: ceil(V / N) of the V rows (the largest shard), so its memory falls as 1 / N."""
    match = _head_note(runs[f"tp{tp}"][1], tp)
    rows, vocab = int(match.group(1)), int(match.group(2))
    assert vocab == VOCAB and rows == math.ceil(VOCAB / tp) and rows * HIDDEN <= VOCAB * HIDDEN / tp + HIDDEN
    assert match.group(3) == decoder
    if decoder == "replicated":
        assert "num_attention_heads 2 is not divisible by 3" in runs["tp3"][1]
    assert f"under --tp {tp}, logit check: " in runs[f"tp{tp}"][1]  # the sharded head checked against the logits


@torchrun
def test_final_model_is_a_plain_transformers_model(runs):
    from transformers import AutoModelForCausalLM

    out = runs["tp2"][0]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    saved = {f"policy.{k}": v for k, v in model.state_dict().items()}
    state = checkpoint(out, STEPS)["model"]
    for key, tensor in saved.items():
        assert torch.equal(tensor, state[key]), key


@torchrun
def test_tp_resume_continues_exactly(runs, tmp_path):
    """Resume ``--tp 2`` from its step-2 checkpoint (full state, re-sharded on load): step 3 as uninterrupted."""
    uninterrupted = runs["tp2"][0]
    out = tmp_path / "resumed"
    shutil.copytree(uninterrupted, out)
    train(out, 2, "--tp", "2", "--resume", str(out / "checkpoints" / "checkpoint-000002.pt"))
    assert_same_tensors(checkpoint(uninterrupted, STEPS)["model"], checkpoint(out, STEPS)["model"], "--tp 2 resumed")
    assert without_timing(metrics_rows(out)) == without_timing(metrics_rows(uninterrupted))



# ---- dp x tp, at the level of the pieces: a 2 x 2 mesh of bare gloo processes -------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dp_by_tp_mesh_averages_over_dp_and_clips_the_whole_gradient(tmp_path):
    from tp_workers import dp_tp_worker

    mp.spawn(dp_tp_worker, args=(4, _free_port(), str(tmp_path)), nprocs=4, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(4)]
    assert [(r["dp"], r["tp"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["sampler"] for r in results] == [(0, 2), (0, 2), (1, 2), (1, 2)]  # a copy's ranks share a batch
    mean = [torch.arange(14.0).view(7, 2) * 1.5, torch.tensor([3.0, 4.0]) * 1.5]  # of the copies' (x1, x2)
    expected = float(torch.cat([m.reshape(-1) for m in mean]).norm())
    for r in results:
        assert r["total"] == pytest.approx(expected, rel=1e-6)
        scale = 1.0 / (expected + 1e-6)
        assert torch.allclose(r["head"], mean[0] * scale) and torch.allclose(r["norm"], mean[1] * scale)


# ---- refusals: one line, exit 2 ----------------------------------------------------------------
@pytest.mark.parametrize("extra, world, fragments", [
    ((), "1", ("--tp 2 needs 2 processes", "torchrun --nproc-per-node 2")),
    (("--fsdp",), "2", ("--tp 2 with --fsdp",)),
    (("--lora",), "2", ("--tp 2 with --lora",)),
])
def test_tp_refusals_before_anything_loads(tmp_path, capsys, monkeypatch, extra, world, fragments):
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_main(micro_args(tmp_path, "--tp", "2", *extra), capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


@torchrun
def test_tp_not_dividing_the_processes_under_torchrun(tmp_path):
    result = run_upo_train(micro_args(tmp_path, "--tp", "3"), processes=2, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.startswith("upo-train: ")]
    assert lines == ["upo-train: error: --tp 3: the 2 processes are not a multiple of 3; use --nproc-per-node 3 "
                     "or a --tp dividing 2"], result.stderr[-3000:]
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr  # torchrun reports the workers' status 2
    assert "upo/train" not in result.stderr  # no traceback of ours
