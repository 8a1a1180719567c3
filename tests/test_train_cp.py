"""``upo-train --cp N`` (context parallelism) on CPU processes (torchrun, gloo), against one process.

Each setting trains 2 steps in one process and under ``--cp``: the first step's loss, metrics and gradient norm must
equal one process's (fp32, 1e-5), and so must the second's. The settings cover prompt sharing with UPO's value head
and gradient checkpointing on 2 processes; the unshared rows with KTO's mismatched pairs and UPO under LoRA on 3;
FSDP2 with a precomputed reference on 2. The per-parameter gradients and the planted faults are checked at the
level of the module (``test_context_parallel.py``), where they are cheaper.
"""
import contextlib
import io
from types import SimpleNamespace

import pytest

from train_helpers import MICRO, assert_one_line_error, metrics_rows, micro_args, run_main, run_upo_train
from upo.train.cli import main

ARGS = ["--model-config", MICRO, "--max-examples", "16", "--batch-size", "4", "--max-steps", "2",
        "--eval-fraction", "0.25", "--eval-every", "2", "--save-every", "2", "--backend", "torch", "--device", "cpu",
        "--no-progress", "--max-length", "96"]
UPO = ["--aux-reward", "readability:1.0", "--baseline", "value"]

SETTINGS = {  # name: (processes, flags shared by the one-process run and the --cp run)
    "shared-upo-checkpointing": (2, ["--share-prompt", "--loss-type", "sigmoid", "upo", *UPO,
                                     "--gradient-checkpointing"]),
    "rows-kto-upo-lora": (3, ["--loss-type", "kto", "upo", *UPO, "--lora"]),
    "fsdp-precomputed-kto": (2, ["--fsdp", "--precompute-ref", "--loss-type", "kto"]),
}


def torchrun(test):
    return pytest.mark.slow(pytest.mark.xdist_group("torchrun")(test))


def train(output_dir, processes: int, extra) -> str:
    args = [*ARGS, "--output-dir", str(output_dir), *extra]
    if processes == 1:
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            assert main(args) == 0, errors.getvalue()[-3000:]
        return errors.getvalue()
    result = run_upo_train(args, processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@torchrun
@pytest.mark.parametrize("name", SETTINGS)
def test_cp_trains_as_one_process(name, tmp_path):
    processes, flags = SETTINGS[name]
    train(tmp_path / "one", 1, flags)
    train(tmp_path / "cp", processes, [*flags, "--cp", str(processes)])
    one, split = metrics_rows(tmp_path / "one"), metrics_rows(tmp_path / "cp")
    assert [r["step"] for r in split] == [1, 2]
    for a, b in zip(one, split):
        for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins", "entropy",
                    "mean_token_accuracy", "value/loss", "value/grad_norm", "eval/loss"):
            # margins are beta x a difference of four sums of ~100 nats: after a step, AdamW's update from gradients
            # that differ in fp32's last bits leaves them 3e-6 apart (measured: step 1 agrees to 1e-7)
            floor = 1e-5 if key == "rewards/margins" and a["step"] > 1 else 1e-6
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=floor), (name, a["step"], key, a[key], b[key])
        assert b["tokens"] == a["tokens"], name  # the ranks of a sequence count its tokens once


# ---- refusals: one line, exit 2 ----------------------------------------------------------------
@pytest.mark.parametrize("extra, world, fragments", [
    ((), "1", ("--cp 2 splits each sequence over 2 processes", "torchrun --nproc-per-node 2")),
    (("--tp", "2"), "2", ("--cp with --tp is not supported",)),
    (("--packing",), "2", ("--cp with --packing is not supported",)),
])
def test_cp_refusals_before_anything_loads(tmp_path, capsys, monkeypatch, extra, world, fragments):
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_main(micro_args(tmp_path, "--cp", "2", *extra), capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_cp_refuses_attention_it_cannot_split():
    from transformers import LlamaConfig, LlamaForCausalLM

    from upo.train.errors import UserError
    from upo.train.model_checks import check_attention

    def check_context_parallel_attention(model):
        check_attention(SimpleNamespace(share_prompt=False, cp=2), model)

    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, attn_implementation="eager")
    with pytest.raises(UserError, match="--cp: context parallelism runs attention as SDPA .* 'eager'"):
        check_context_parallel_attention(LlamaForCausalLM(config))
    config.sliding_window = 16
    config._attn_implementation = "sdpa"
    with pytest.raises(UserError, match="sliding window of 16"):
        check_context_parallel_attention(LlamaForCausalLM(config))
