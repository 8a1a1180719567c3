"""benchmarks/long_sequence.py: the memory floor's arithmetic, checked by hand and against a real decoder layer,
and the benchmark's dry run (every system once on a tiny Llama) with its JSON schema."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.live_tensors import LiveTensorPeak, tensor_bytes_alive
from benchmarks.long_sequence import Dims, longest_within, memory_floor, partial_file, rank_result, step_tokens

ROOT = Path(__file__).resolve().parent.parent

# SmolLM2-135M-Instruct's config.json (the fields the floor reads)
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True}


def test_floor_of_smollm2_by_hand():
    # One pair, prompt 1024 + each response 3072 tokens, gradient checkpointing, fp32, full fine-tuning.
    # tokens: 2 x (1024 + 3072) = 8192
    # weights: embedding 49152*576 = 28,311,552 (tied head); per layer q 576*576 + k, v 2*576*192 + o 576*576
    #   + mlp 3*576*1536 + 2 norms 2*576 = 331,776 + 221,184 + 331,776 + 2,654,208 + 1,152 = 3,540,096;
    #   30 layers 106,202,880; final norm 576: 134,515,008 -> gradients 538,060,032 bytes
    # checkpoints: 30 layers * 8192 * 576 * 4 = 566,231,040
    # one layer's saved floats per token: norm1 2*576+1 = 1,153; attention q 576 + k, v 384 + out 576 + lse 9
    #   = 1,545; norm2 3*576+1 = 1,729; mlp 4*1536 = 6,144 -> 10,571; * 8192 * 4 = 346,390,528
    # final norm: 3 * 8192 * 576 * 4 = 56,623,104; loss tile 3 * 2048 * 384 * 4 = 9,437,184
    floor = memory_floor(SMOLLM2, 1024, 3072)
    assert floor["tokens"] == 8192
    assert floor["parts"] == {"gradients": 538_060_032, "checkpoints": 566_231_040, "layer_recompute": 346_390_528,
                              "head_input": 56_623_104, "loss_tile": 9_437_184}
    assert floor["total"] == 1_516_741_888
    # in the backward's order: head gradient E = 49152*576*4 = 113,246,208; a layer's gradients 3,540,096*4 =
    # 14,160,384; a checkpoint 8192*576*4 = 18,874,368. Loss: E + 30 checkpoints + final norm + tile = 745,537,536;
    # last layer: E + 30 checkpoints + recompute = 1,025,867,776; first: E + 29 layers' gradients + 1 checkpoint +
    # recompute = 889,162,240; end: every gradient + the embedding's dense one = 651,306,240
    assert floor["in_order"] == 1_025_867_776


def test_floor_without_checkpointing_and_shared_prompt_by_hand():
    # prompt 3000 + responses 1000: shared, 3000 + 2*1000 = 5000 tokens through the model
    # every layer keeps its input too: (10,571 + 576) floats per token * 30 layers * 5000 * 4 bytes
    floor = memory_floor(SMOLLM2, 3000, 1000, share_prompt=True, gradient_checkpointing=False, trainable=1000)
    assert floor["tokens"] == 5000 == step_tokens(3000, 1000, True)
    assert floor["parts"] == {"gradients": 4000, "activations": 6_688_200_000, "head_input": 34_560_000,
                              "loss_tile": 9_437_184}
    # in order, LoRA-like (1000 trainable weights, no head gradient): at the loss's backward every layer's
    # activations 6,688,200,000 + the final norm 34,560,000 + the tile 9,437,184
    assert floor["in_order"] == 6_732_197_184
    assert step_tokens(3000, 1000, False) == 8000


def test_context_parallel_systems_are_named_by_their_processes():
    from benchmarks.long_sequence import is_shared, processes_of

    assert [processes_of(s) for s in ("upo-train", "upo-train-shared", "upo-train-cp2", "upo-train-shared-cp3")] == [
        1, 1, 2, 3]
    assert is_shared("upo-train-shared-cp2") and not is_shared("upo-train-cp2")


def test_floor_of_one_rank_under_context_parallelism_by_hand():
    # The pair of test_floor_of_smollm2_by_hand over 2 ranks: 8192 tokens, 4096 a rank. Gradients whole
    # (538,060,032); checkpoints 30 * 4096 * 576 * 4 = 283,115,520; one layer's recompute 10,571 * 4096 * 4 =
    # 173,195,264; final norm 3 * 4096 * 576 * 4 = 28,311,552; loss tile 3 * 2048 * 384 * 4 = 9,437,184 (a rank
    # has over 2048 tokens); the gathered keys and values of one layer over all 8192 tokens, and their gradients:
    # 2 * 2 * 8192 * 3 heads * 64 * 4 = 25,165,824
    floor = memory_floor(SMOLLM2, 1024, 3072, context_parallel=2)
    assert floor["tokens"] == 4096
    assert floor["parts"] == {"gradients": 538_060_032, "gathered_kv": 25_165_824, "checkpoints": 283_115_520,
                              "layer_recompute": 173_195_264, "head_input": 28_311_552, "loss_tile": 9_437_184}
    # in order: the first layer's backward, E 113,246,208 + 29 layers' gradients 29 * 14,160,384 + its checkpoint
    # 4096 * 576 * 4 + its recompute + the gathered K/V (the last layer's: E + 30 checkpoints + the same, less)
    assert floor["in_order"] == 113_246_208 + 29 * 14_160_384 + 9_437_184 + 173_195_264 + 25_165_824 == 731_695_616
    # 3 ranks: 8192 / 3 rounds up to 2731 tokens
    assert memory_floor(SMOLLM2, 1024, 3072, context_parallel=3)["tokens"] == 2731


def test_longest_length_within_the_cap_by_hand():
    def case(system, length, peak):
        return {"status": "ok", "system": system, "mix": "prompt_heavy", "gradient_checkpointing": True,
                "length": length, "steps_measured": [{"peak_bytes": peak - 1}, {"peak_bytes": peak}]}

    records = [case("a", 500, 1e9), case("a", 1000, 3e9), case("a", 2000, 5e9), case("b", 1000, 9e9),
               {"status": "error"}]
    # a: through its two longest, 2e6 bytes per token from (2000, 5e9): 8e9 at 2000 + 3e9 / 2e6 = 3500;
    # b: one length, over the cap
    assert longest_within(records, 8e9) == {"a/prompt_heavy/gc": {"measured": 2000, "extrapolated": 3500},
                                            "b/prompt_heavy/gc": {"measured": None, "extrapolated": None}}


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_the_models(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=301, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    assert Dims.from_config(config).parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kv_heads", [2, 6])
def test_saved_per_token_is_what_a_decoder_layer_saves(kv_heads):
    """Every tensor a real Llama layer (SDPA) saves for its backward, weights and RoPE tables apart."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=301, hidden_size=96, intermediate_size=160, num_hidden_layers=1,
                         num_attention_heads=6, num_key_value_heads=kv_heads, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    tokens = 37
    x = torch.randn(1, tokens, config.hidden_size, requires_grad=True)
    rope = model.model.rotary_emb(x, torch.arange(tokens)[None])
    saved = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.model.layers[0](x, position_embeddings=rope, attention_mask=None)
    not_activations = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *rope]}
    activation_bytes = sum(n for ptr, n in saved.items() if ptr not in not_activations)
    assert activation_bytes == tokens * 4 * Dims.from_config(config).saved_per_token(with_input=True)


def test_live_tensors_count_each_storage_once_and_the_peak_of_a_block():
    torch.manual_seed(0)
    sizes = torch.randint(1_000, 50_000, (3,)).tolist()
    before = tensor_bytes_alive()
    kept = torch.empty(sizes[0], dtype=torch.float64)
    views = [kept[1:7], kept.view(2, -1) if sizes[0] % 2 == 0 else kept[None], torch.nn.Parameter(kept)]
    assert tensor_bytes_alive() - before == 8 * sizes[0]  # a view or a parameter of a storage adds nothing
    older = torch.empty(sizes[1])
    with LiveTensorPeak() as live:
        del older  # a tensor older than the block is not seen freed: what follows still counts from 0
        a = torch.empty(sizes[1], dtype=torch.float32)
        b = torch.empty(sizes[2], dtype=torch.int16)
        del a
        c = torch.empty(7, dtype=torch.float64)  # smaller than what a freed
        del b, c
    assert live.extra == 4 * sizes[1] + 2 * sizes[2]
    with LiveTensorPeak() as live:
        del kept, views
    assert live.extra == 0


def test_the_process_peak_counts_what_came_before_the_measured_steps():
    """The high-water mark is reset before each measured step; the process's peak keeps the mark it had."""
    from benchmarks.long_sequence import _step_recorder
    from benchmarks.measure import current_rss

    recorder, steps = _step_recorder("cpu")
    loading = torch.ones(50_000_000)  # 200 MB, touched: what loading or a warm-up step would hold
    at_loading = current_rss()
    del loading  # an mmap-sized buffer: glibc gives it back, the resident set drops
    for _ in range(2):
        with recorder():
            torch.ones(1000).sum()
    assert steps[0]["process_peak_bytes"] >= at_loading - 2**20  # VmHWM can lag the resident set by a few pages
    assert steps[1]["process_peak_bytes"] >= steps[0]["process_peak_bytes"]  # the process's peak so far


def test_dry_run_writes_every_system_and_the_floor(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.long_sequence", "--dry-run", "--cp", "2", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    path = Path(done.stdout.strip().splitlines()[-1])
    doc = json.loads(path.read_text())
    assert doc["schema"] == 1 and doc["environment"]["device"] == "cpu"
    systems = {"upo-train", "upo-train-shared", "upotrainer", "upotrainer-shared", "trl", "upo-train-cp2",
               "upo-train-shared-cp2"}
    try:
        import trl  # noqa: F401
    except ImportError:
        systems = {"upo-train", "upo-train-shared", "upo-train-cp2", "upo-train-shared-cp2"}
    assert {case["system"] for case in doc["cases"]} == systems
    for case in doc["cases"]:
        assert case["status"] == "ok"
        assert case["prompt_tokens"] == 18 and case["response_tokens"] == 6 and case["gradient_checkpointing"]
        assert case["extra_bytes"] >= 0 and case["step_seconds"] > 0
        # the process's peak (its whole life to the end of the measured steps) and the tensors' (one more step)
        assert case["process_peak_bytes"] == case["steps_measured"][-1]["process_peak_bytes"] >= case["live_peak_bytes"]
        assert case["live_peak_bytes"] == case["state_bytes"] + case["live_extra_bytes"] > case["live_extra_bytes"] > 0
        assert case["state_bytes"] >= 4 * 2 * case["trainable"]  # the policy and its reference copy at least
        assert case["process_over_live"] == case["process_peak_bytes"] / case["live_peak_bytes"]
        shared, ranks = "-shared" in case["system"], 2 if case["system"].endswith("-cp2") else 1
        assert case["floor_bytes"] == memory_floor(doc["model_config"], 18, 6, share_prompt=shared,
                                                   trainable=case["trainable"], context_parallel=ranks)["total"]
        if ranks > 1:  # the worst of the two ranks, each rank's figures beside it
            assert len(case["ranks"]) == 2
            assert case["process_peak_bytes"] == max(r["process_peak_bytes"] for r in case["ranks"])
            assert case["extra_bytes"] == max(r["extra_bytes"] for r in case["ranks"])
        assert case["trainable"] == Dims.from_config(doc["model_config"]).parameters()
    report = path.with_suffix(".md").read_text()
    assert report.startswith("# Long sequences")
    assert "process peak = the process's resident set at its highest" in report
    assert path.with_suffix(".png").stat().st_size > 0
    assert set(doc["longest_within_cap"]) == {f"{s}/prompt_heavy/gc" for s in systems}
    assert all(set(v) == {"measured", "extrapolated"} for v in doc["longest_within_cap"].values())


@pytest.mark.parametrize("flags, message", [
    (["--systems", "upo-train,trll"], "--systems: unknown trll"),
    (["--lengths", "1k"], "--lengths: comma-separated integers expected"),
    (["--mixes", "balanced"], "--mixes: unknown balanced"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--cp", "0"], "--cp 0: an integer >= 1 expected"),
    (["--systems", "upo-train-cp1"], "--systems: unknown upo-train-cp1"),
])
def test_bad_flags_are_one_line(flags, message):
    done = subprocess.run([sys.executable, "-m", "benchmarks.long_sequence", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"long_sequence: error: {done.stderr.split('error: ', 1)[1].strip()}"]
    assert message in done.stderr


def test_each_rank_writes_its_record_through_a_file_of_its_own(tmp_path):
    """A --cp case's ranks write their records at the same time: one shared partial file made one rank rename
    the other's record as its own, and the other crash (CI, 2026-12-08)."""
    result = tmp_path / "result.json"
    parts = {partial_file(rank_result(result, rank)) for rank in range(3)}
    assert len(parts) == 3 and all(part.parent == tmp_path for part in parts)
