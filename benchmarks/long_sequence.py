"""Long sequences end to end: peak memory and time of one whole training step against the sequence length.

One pair per step (fp32 weights, full fine-tuning or ``--lora``, AdamW), for ``upo-train``
(:class:`upo.train.trainer.Trainer`, driven step by step), ``UPOTrainer`` and TRL's ``DPOTrainer``, each with and
without prompt sharing where it has it, with and without gradient checkpointing, for a response-heavy and a
prompt-heavy mix, beside the step's memory floor computed from the model's config (:func:`memory_floor`).

    python -m benchmarks.long_sequence                       # SmolLM2-135M-Instruct, the default grid (2-core CPU:
                                                             # ~80 min, 32 cases)
    python -m benchmarks.long_sequence --lengths 1024,2048 --systems upo-train,trl --mixes prompt_heavy
    python -m benchmarks.long_sequence --dry-run             # a tiny Llama, seconds: the code path and the schema
    python -m benchmarks.long_sequence --render results.json # the markdown table and plot again

Every case runs in a fresh process (``--case``). It loads the model, runs ``--warmup`` steps (which allocate
the optimiser's state), then measures ``--steps`` steps: **extra** is the peak over the memory held when the step
starts (the model, the reference, the optimiser's state: what a step cannot avoid holding), so it is the
step's own memory: gradients, activations, the loss. CPU: the resident set's high-water mark, reset before each
step (``benchmarks/measure.py``), in a process started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
buffers go back to the OS and the RSS follows what is alive (``--malloc default`` measures glibc's defaults,
``tcmalloc`` and ``jemalloc`` preload the library upo-train would); CUDA: ``max_memory_allocated``. Time: the
median of the measured steps' wall time.

Beside it, two peaks of the whole: the **process peak**, the resident set's high-water mark of the case's process
from its start to the end of the measured steps (loading, warm-up, steps: what ``top`` and the out-of-memory
killer see, whatever the allocator keeps; per step in ``steps_measured``, so that its growth over a run shows),
and the **live peak**, the tensors alive at a step's worst moment: those alive at its start plus its own peak,
from one more step run under PyTorch's profiler (``benchmarks/live_tensors.py``). CUDA: ``max_memory_reserved``
and ``max_memory_allocated``.

Results: ``long-sequence-<date>.json`` (every case, the floor's parts, the environment) and beside it ``.md``
(tables) and ``.png`` (extra memory against L); ``--out`` as the other benchmarks (``benchmarks/common.py``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import out_dir, write_json
from upo.train.allocator import INSTALL, LIBRARIES, allocator_in_use, find_library, preload_environment

SYSTEMS = ("upo-train", "upo-train-shared", "upotrainer", "upotrainer-shared", "trl")
# --cp N adds upo-train --cp N under torchrun (N processes split each sequence; a case's figures are its worst
# rank's), unshared and shared: these two names with N
CONTEXT_PARALLEL_SYSTEMS = ("upo-train-cp{}", "upo-train-shared-cp{}")
# (prompt share, response share) of a sequence of L tokens: prompt + one response.
MIXES = {"response_heavy": (0.25, 0.75), "prompt_heavy": (0.75, 0.25), "even": (0.5, 0.5)}
DEFAULT_MIXES = ("response_heavy", "prompt_heavy")  # even: the prompt and each response L / 2 (issue 30's runs)
DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_CAP_GB = 8.0
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# upo's torch backend's logit tile ([3, chunk_tokens, chunk_vocab] fp32, upo_kernels/chunked.py)
LOSS_TILE = (3, 2048, 384)
SCHEMA_VERSION = 1
MALLOCS = ("mmap", "default", *LIBRARIES)


# ---- the floor ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dims:
    """What the floor needs of a decoder-only (Llama-type) config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config) -> "Dims":
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = get("num_attention_heads")
        return cls(hidden=get("hidden_size"), intermediate=get("intermediate_size"), layers=get("num_hidden_layers"),
                   heads=heads, kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads, vocab=get("vocab_size"),
                   tied=bool(get("tie_word_embeddings", False)))

    def parameters(self) -> int:
        """Weights of the model (embedding, layers, final norm, the head unless tied)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate + 2 * d
        return self.vocab * d * (1 if self.tied else 2) + self.layers * layer + d

    def saved_per_token(self, with_input: bool) -> int:
        """Floats one decoder layer's backward keeps per token: what a transformers Llama layer under SDPA saves.

        RMSNorm 1: its normalised input, its output (shared by the q, k, v projections) and 1/rms; attention:
        the rotated q and k, v, its output (o_proj's input) and a logsumexp per head (SDPA's flash path; a math
        path would also keep [heads, T, T] probabilities); RMSNorm 2: its input, normalised input, output and
        1/rms; the MLP: gate, silu(gate), up and their product (down_proj's input). ``with_input``: the layer's
        input too (without gradient checkpointing; with it the input is the checkpoint, counted apart).
        tests/test_long_sequence_bench.py checks this count against the tensors a real layer saves.
        """
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        norm1 = 2 * d + 1
        attention = q + 2 * kv + q + self.heads
        norm2 = 3 * d + 1
        mlp = 4 * i
        return norm1 + attention + norm2 + mlp + (d if with_input else 0)


def processes_of(system: str) -> int:
    """The processes of one sequence: N for upo-train-[shared-]cpN, else 1."""
    return int(system.rsplit("-cp", 1)[1]) if "-cp" in system else 1


def is_shared(system: str) -> bool:
    return "-shared" in system


def one_process_unshared(system: str) -> bool:
    """A system whose floor is the table's and plot's reference line: whole unshared rows on one process."""
    return not is_shared(system) and processes_of(system) == 1


def step_tokens(prompt: int, response: int, share_prompt: bool) -> int:
    """Tokens one pair puts through the model: [prompt, chosen] and [prompt, rejected], or shared [p, c, r]."""
    return prompt + 2 * response if share_prompt else 2 * (prompt + response)


def memory_floor(config, prompt: int, response: int, *, share_prompt: bool = False,
                 gradient_checkpointing: bool = True, trainable: int | None = None,
                 dtype: str = "float32", context_parallel: int = 1) -> dict:
    """Bytes one training step of one pair must hold beyond the model, reference and optimiser state.

    - gradients: one per trainable weight (``trainable``; default every weight of the config);
    - activations: with gradient checkpointing, every layer's input (the checkpoints) plus one layer's
      saved tensors during its recompute; without, every layer's saved tensors and input;
    - the final norm's input, normalised input and output (the head's input);
    - the loss: one logit tile of upo's torch backend (the loss never holds [tokens, vocab] logits).

    ``total`` adds them up (the issue's floor); it overstates what must coexist, since the backward frees each
    layer's checkpoint as it allocates that layer's gradients. ``in_order`` follows the backward instead: the
    largest of what is alive at the loss's backward, at the last layer's recompute, at the first layer's, and at
    the end, where the embedding's dense gradient is summed into a tied head's (:func:`backward_in_order`). The
    reference's forward runs without gradients (one layer's activations at a time, before the policy's backward)
    and adds nothing to either. The attention probabilities of a math path ([heads, T, T]) are not counted: a
    floor is what the fastest path needs.

    ``context_parallel`` N: one rank's floor under ``--cp N``. The activations, checkpoints and loss are its
    share of the tokens (``ceil(tokens / N)``); the gradients are whole (every rank holds the model); one layer's
    keys and values, gathered from every rank over the whole sequence, and their gradients are added
    (``gathered_kv``).
    """
    dims = Dims.from_config(config)
    size = FLOAT_BYTES[dtype]
    whole = step_tokens(prompt, response, share_prompt)
    tokens = -(-whole // context_parallel)
    trainable = dims.parameters() if trainable is None else trainable
    parts = {"gradients": trainable * size}
    if context_parallel > 1:
        parts["gathered_kv"] = 2 * 2 * whole * dims.kv_heads * dims.head_dim * size
    if gradient_checkpointing:
        parts["checkpoints"] = dims.layers * tokens * dims.hidden * size
        parts["layer_recompute"] = tokens * dims.saved_per_token(with_input=False) * size
    else:
        parts["activations"] = dims.layers * tokens * dims.saved_per_token(with_input=True) * size
    parts["head_input"] = 3 * tokens * dims.hidden * size
    parts["loss_tile"] = LOSS_TILE[0] * min(LOSS_TILE[1], tokens) * min(LOSS_TILE[2], dims.vocab) * 4
    in_order = backward_in_order(dims, parts, size, full=trainable == dims.parameters())
    return {"tokens": tokens, "parts": parts, "total": sum(parts.values()), "in_order": in_order}


def backward_in_order(dims: Dims, parts: dict, size: int, full: bool = True) -> int:
    """The floor along the backward of a step: the max of four moments' live bytes.

    ``head``: the head's weight gradient (V x D, made first, by the loss; none unless ``full``); ``layer``: one
    layer's weight gradients (not ``full``, e.g. LoRA: the trainable weights spread evenly over the layers);
    ``kept``: one layer's checkpoint (with checkpointing) or its saved tensors and input (without).
    1. the loss's backward: head + every layer's kept + the final norm's tensors + the loss tile;
    2. the last layer's backward: head + every layer's kept + (with checkpointing) its recompute;
    3. the first layer's: head + the other layers' gradients + its kept + its recompute;
    4. the end: every gradient, plus the embedding's dense gradient before a tied head's sums it in.
    """
    n = dims.layers
    head = dims.vocab * dims.hidden * size if full else 0
    layer = ((dims.parameters() - dims.vocab * dims.hidden * (1 if dims.tied else 2) - dims.hidden) * size // n
             if full else parts["gradients"] // n)
    kept = (parts["checkpoints"] if "checkpoints" in parts else parts["activations"]) // n
    recompute = parts.get("layer_recompute", 0) + parts.get("gathered_kv", 0)
    moments = [head + n * kept + parts["head_input"] + parts["loss_tile"],
               head + n * kept + recompute,
               head + (n - 1) * layer + kept + recompute,
               parts["gradients"] + (head if dims.tied else 0)]
    return max(moments)


# ---- one case, in its own process --------------------------------------------------------------------------
@dataclass
class Case:
    system: str
    mix: str
    length: int  # tokens per sequence (prompt + one response)
    gradient_checkpointing: bool
    model: str
    device: str = "cpu"
    warmup: int = 1
    steps: int = 1
    lora: bool = False  # LoRA rank 8 on every linear layer (upo-train's --lora; the same for TRL's systems)

    @property
    def prompt_tokens(self) -> int:
        return round(self.length * MIXES[self.mix][0])

    @property
    def response_tokens(self) -> int:
        return self.length - self.prompt_tokens

    @property
    def key(self) -> str:
        return f"{self.system}/{_setting(self.mix, self.gradient_checkpointing, self.lora)}/L{self.length}"


def _setting(mix: str, gradient_checkpointing: bool, lora: bool) -> str:
    return f"{mix}/{'gc' if gradient_checkpointing else 'nogc'}{'/lora' if lora else ''}"


def _setting_of(record: dict) -> tuple:
    return record["mix"], record["gradient_checkpointing"], record.get("lora", False)


def _settings(doc: dict, records: list[dict]) -> list[tuple]:
    """The (mix, checkpointing, LoRA) settings measured, in the grid's order."""
    seen = {_setting_of(r) for r in records}
    return [(m, gc, lora) for m in doc["mixes"] for gc in doc["gradient_checkpointing"] for lora in (False, True)
            if (m, gc, lora) in seen]


def _filler(tokenizer, tokens: int) -> str:
    """A text of exactly ``tokens`` tokens (a repeated word; the content does not change memory or time)."""
    for word in (" the", " a", "x"):
        text = word * tokens
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == tokens:
            return text
    raise RuntimeError(f"no filler word tokenizes to one token per word for {type(tokenizer).__name__}")


def _rows(case: Case, tokenizer, n: int = 8) -> list[dict]:
    prompt = _filler(tokenizer, case.prompt_tokens)
    response = _filler(tokenizer, case.response_tokens)
    return [{"prompt": prompt, "chosen": response, "rejected": response}] * n


def _step_recorder(device: str, on_step=lambda records: None):
    """A context manager per measured step, and the list it fills; ``on_step(records)`` after each step."""
    from benchmarks import measure

    records = []

    class Recorder:
        def __enter__(self):
            self.mem = measure.PeakMemory(device).__enter__()
            measure.sync(device)
            self.t0 = time.perf_counter()
            return self

        def __exit__(self, *exc):
            measure.sync(device)
            seconds = time.perf_counter() - self.t0
            self.mem.__exit__(*exc)
            # the process's peak so far: the high-water mark before each reset, and this step's (CUDA: reserved)
            marks = [self.mem.reserved] if self.mem.reserved is not None else [self.mem.before_reset, self.mem.peak]
            so_far = max(m for m in [*marks, records[-1]["process_peak_bytes"] if records else 0] if m is not None)
            records.append({"seconds": seconds, "base_bytes": self.mem.base, "peak_bytes": self.mem.peak,
                            "extra_bytes": self.mem.extra, "method": self.mem.method,
                            "process_peak_bytes": so_far})
            on_step(records)
            return False

    return Recorder, records


def make_upo_train(case: Case, data: Path, workdir: Path, runtime=None):
    """``upo-train``'s :class:`Trainer` for this case (sigmoid loss, one pair per step, lr 1e-6), on ``runtime``
    (made here when None)."""
    from upo.train.config import build_config
    from upo.train.trainer import Trainer

    config = build_config({}, {
        "model": case.model, "dataset": str(data), "batch_size": 1, "max_length": 4 * case.length,
        "loss_type": ["sigmoid"], "gradient_checkpointing": case.gradient_checkpointing,
        "share_prompt": is_shared(case.system), "max_steps": _total_steps(case), "lr": 1e-6,
        "cp": processes_of(case.system),
        "warmup_steps": 0, "eval_every": 10 ** 6, "save_every": 10 ** 6, "output_dir": str(workdir / "run"),
        "progress": False, "device": case.device, "logit_check": False,  # the check is start-up, not the step
        "lora": case.lora})
    return Trainer(config, runtime, log=lambda message: None)


def make_trl_trainer(case: Case, data: Path, workdir: Path, callbacks=()):
    """TRL's ``DPOTrainer`` (``trl``) or ``UPOTrainer`` (``upotrainer[-shared]``) in TRL's defaults but fp32 and
    one pair per step, no length limit, the same learning rate and loss as :func:`make_upo_train`."""
    from datasets import Dataset

    from upo.pretrained import load_causal_lm, load_tokenizer

    common = dict(output_dir=str(workdir / "run"), per_device_train_batch_size=1, max_steps=_total_steps(case),
                  learning_rate=1e-6, lr_scheduler_type="constant", max_length=None, bf16=False, report_to=[],
                  logging_steps=1, save_strategy="no", gradient_checkpointing=case.gradient_checkpointing,
                  dataloader_num_workers=0, use_cpu=case.device == "cpu", disable_tqdm=True, loss_type=["sigmoid"])
    if case.system == "trl":
        from trl import DPOConfig, DPOTrainer

        args, trainer_class = DPOConfig(**common), DPOTrainer
    else:
        from upo.integrations.trl import UPOConfig, UPOTrainer

        args = UPOConfig(**common, share_prompt=is_shared(case.system))
        trainer_class = UPOTrainer
    model, tokenizer = load_causal_lm(case.model), load_tokenizer(case.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    peft = None
    if case.lora:
        from peft import LoraConfig

        peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=list(callbacks), peft_config=peft)


def _total_steps(case: Case) -> int:
    """Warm-up, measured, and on CPU one more step for the live-tensor peak."""
    return case.warmup + case.steps + (case.device == "cpu")


class _LiveStep:
    """The step after the measured ones, under the profiler: the tensors alive at its start and its own peak."""

    def __enter__(self):
        from benchmarks.live_tensors import LiveTensorPeak, tensor_bytes_alive

        self.state = tensor_bytes_alive()
        self.live = LiveTensorPeak().__enter__()
        return self

    def __exit__(self, *exc):
        self.live.__exit__(*exc)
        self.result = {"state_bytes": self.state, "live_extra_bytes": self.live.extra,
                       "live_peak_bytes": self.state + self.live.extra}
        return False


def _run_upo_train(case: Case, data: Path, workdir: Path, recorder) -> dict:
    from upo.train.runtime import barrier, setup_runtime, teardown_runtime

    runtime = setup_runtime(case.device)
    try:  # the trainer, which holds --cp's process groups, is gone before teardown joins their threads (as upo-train)
        info = _measure_upo_train(case, data, workdir, recorder, runtime)
        barrier(runtime)  # every rank done before any tears the groups down
        return info
    finally:
        teardown_runtime(runtime)


def _measure_upo_train(case: Case, data: Path, workdir: Path, recorder, runtime) -> dict:
    with make_upo_train(case, data, workdir, runtime) as trainer:
        for step in range(case.warmup + case.steps):
            if step < case.warmup:
                trainer.train_step()
                continue
            with recorder():
                trainer.train_step()
        live = {}
        if case.device == "cpu":
            with _LiveStep() as step:
                trainer.train_step()
            live = step.result
        return {"trainable": sum(p.numel() for p in trainer.params),
                "attn_implementation": trainer.module.policy.config._attn_implementation, **live}


def _run_trl(case: Case, data: Path, workdir: Path, recorder) -> dict:
    from transformers import TrainerCallback

    class Measure(TrainerCallback):
        def __init__(self):
            self.step, self.active, self.live = 0, None, {}

        def on_step_begin(self, args, state, control, **kw):
            if self.step >= case.warmup:
                self.active = (recorder() if self.step < case.warmup + case.steps else _LiveStep()).__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.active is not None:
                self.active.__exit__(None, None, None)
                self.live = getattr(self.active, "result", self.live)
                self.active = None
            self.step += 1

    measure = Measure()
    trainer = make_trl_trainer(case, data, workdir, [measure])
    trainer.train()
    model = trainer.model
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "attn_implementation": model.config._attn_implementation, **measure.live}


def write_pairs(case: Case, path: Path) -> Path:
    """The case's pairs as a jsonl file (both systems read the same file)."""
    from upo.pretrained import load_tokenizer

    path.write_text("".join(json.dumps(row) + "\n" for row in _rows(case, load_tokenizer(case.model))))
    return path


def rank_result(result: Path, rank: int) -> Path:
    """Where rank ``rank`` of a case run under torchrun (``--cp``) writes its record."""
    return result.with_name(f"{result.name}.rank{rank}")


def partial_file(result: Path) -> Path:
    """Where a record is written before it replaces ``result``: each rank's its own (``result.json.rank0.part``),
    since two ranks that shared one renamed each other's record, or crashed on a file the other had moved."""
    return result.with_name(result.name + ".part")


def processes_of_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_case(case: Case, result: Path) -> None:
    """Run the case and write its record to ``result`` (under torchrun: each rank to its own file), also after every
    measured step (marked ``partial``), so that a case stopped by the timeout keeps the steps it measured."""
    import torch

    if processes_of_world() > 1:
        result = rank_result(result, int(os.environ["RANK"]))

    def write(record: dict) -> None:
        part = partial_file(result)
        part.write_text(json.dumps(record))
        os.replace(part, result)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="upo-long-") as tmp:
        workdir = Path(tmp)
        data = write_pairs(case, workdir / "pairs.jsonl")
        recorder, steps = _step_recorder(case.device,
                                         lambda done: write({**case_record(case, {}, done), "partial": True}))
        runner = _run_upo_train if case.system.startswith("upo-train") else _run_trl
        info = runner(case, data, workdir, recorder)
    if not steps:
        raise RuntimeError(f"{case.key}: no step was measured")
    write(case_record(case, info, steps))


def case_record(case: Case, info: dict, steps: list[dict]) -> dict:
    """A case's record from its measured steps and what its runner returned (the live peak, on CPU)."""
    process_peak = steps[-1]["process_peak_bytes"]
    live_peak = info.get("live_peak_bytes", max(s["peak_bytes"] for s in steps) if case.device == "cuda" else None)
    return {**asdict(case), "key": case.key, "prompt_tokens": case.prompt_tokens,
            "response_tokens": case.response_tokens, **info, "steps_measured": steps,
            "extra_bytes": max(s["extra_bytes"] for s in steps),
            "step_seconds": statistics.median(s["seconds"] for s in steps),
            "allocator": allocator_in_use().describe(), "process_peak_bytes": process_peak,
            "live_peak_bytes": live_peak, "process_over_live": process_peak / live_peak if live_peak else None,
            # the process peak's growth from the first measured step (step warmup + 1) to the last
            "process_peak_growth": process_peak / steps[0]["process_peak_bytes"] - 1}


# ---- the grid, in fresh processes --------------------------------------------------------------------------
def _case_env(malloc: str) -> dict:
    env = dict(os.environ)
    if malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    elif malloc in LIBRARIES:  # the library upo-train's --allocator would preload
        env = preload_environment(malloc, find_library(malloc), env)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def worst_rank(records: list[dict]) -> dict:
    """One record of a ``--cp`` case's ranks: the rank with the highest process peak, its extra and time the
    highest over the ranks, and every rank's figures under ``ranks``."""
    if len(records) == 1:
        return records[0]
    record = dict(max(records, key=lambda r: r.get("process_peak_bytes") or 0))
    record["extra_bytes"] = max(r["extra_bytes"] for r in records)
    record["step_seconds"] = max(r["step_seconds"] for r in records)
    record["ranks"] = [{key: r.get(key) for key in ("extra_bytes", "process_peak_bytes", "live_peak_bytes",
                                                    "step_seconds")} for r in records]
    return record


def _cause(output: str) -> str:
    """The lines of a failed case's output that say why (torchrun's own report around them says only that a rank
    failed): the last three that name an error or an abort, else the last three."""
    lines = output.strip().splitlines()
    causes = [line for line in lines if re.search(r"Error|error:|terminate called|[Ss]ignal", line)
              and "elastic/errors.html" not in line]
    return " | ".join((causes or lines)[-3:])


def run_in_process(case: Case, malloc: str, timeout: float) -> dict:
    processes = processes_of(case.system)
    with tempfile.TemporaryDirectory(prefix="upo-case-") as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, "-m", "benchmarks.long_sequence", "--case", json.dumps(asdict(case)),
                   "--result", str(result)]
        if processes > 1:
            command[1:3] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m",
                            "benchmarks.long_sequence"]
        root = Path(__file__).resolve().parent.parent
        try:
            done = subprocess.run(command, cwd=root, env=_case_env(malloc), capture_output=True, text=True,
                                  timeout=timeout)
            failure = None if done.returncode == 0 else ("error", _cause(done.stderr or done.stdout))
        except subprocess.TimeoutExpired:
            failure = ("timeout", f"over {timeout:.0f} s")
        paths = [result] if processes == 1 else [rank_result(result, r) for r in range(processes)]
        texts = [path.read_text() for path in paths if path.exists()]
    records = [json.loads(text) for text in texts if text]
    # the steps measured, if any (a --cp case: only once every rank wrote its own)
    record = worst_rank(records) if len(records) == processes else {**asdict(case), "key": case.key}
    if failure is None:
        return {**record, "status": "ok"}
    return {**record, "status": failure[0], "error": failure[1]}


def grid(systems, mixes, lengths, checkpointing, model, device, warmup, steps, lora=False) -> list[Case]:
    """Every combination, except prompt sharing on a mix whose prompt is the smaller part (little to share)."""
    cases = []  # shortest first, each length for every mix and system: a grid stopped early has whole rows
    for gc in checkpointing:
        for length in lengths:
            for mix in mixes:
                for system in systems:
                    if is_shared(system) and MIXES[mix][0] < 0.5:
                        continue
                    cases.append(Case(system, mix, length, gc, model, device, warmup, steps, lora))
    return cases


def model_config(model: str) -> dict:
    from transformers import AutoConfig

    from upo.pretrained import load_causal_lm, loads_without_upo

    if loads_without_upo(model):
        return AutoConfig.from_pretrained(model).to_dict()
    return load_causal_lm(model).config.to_dict()  # a .gguf file or "smollm2": read through upo's cache


def add_floors(records: list[dict], config: dict) -> None:
    for r in records:
        if r.get("status") != "ok":
            continue
        floor = memory_floor(config, r["prompt_tokens"], r["response_tokens"], share_prompt=is_shared(r["system"]),
                             gradient_checkpointing=r["gradient_checkpointing"], trainable=r["trainable"],
                             context_parallel=processes_of(r["system"]))
        r["floor_bytes"], r["floor_parts"], r["floor_in_order_bytes"] = floor["total"], floor["parts"], floor["in_order"]
        r["extra_over_floor"] = r["extra_bytes"] / floor["total"]
        r["extra_over_floor_in_order"] = r["extra_bytes"] / floor["in_order"] if floor["in_order"] else None


def longest_within(records: list[dict], cap_bytes: float) -> dict:
    """Per (system, mix, checkpointing): the longest measured L whose whole peak (base + extra) fits the cap, and
    the L where the straight line through the peaks at the two longest measured lengths reaches it (TRL's
    tile grows with the tokens up to its chunk size, so the shorter lengths would bend the line): an
    extrapolation, labelled as one (with SDPA's flash kernels a step's memory grows linearly in L, but past the
    measured lengths nothing was measured)."""
    points = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        key = f"{r['system']}/{_setting(*_setting_of(r))}"
        points.setdefault(key, []).append((r["length"], max(s["peak_bytes"] for s in r["steps_measured"])))
    best = {}
    for key, pts in points.items():
        fits = [length for length, peak in pts if peak <= cap_bytes]
        entry = {"measured": max(fits) if fits else None, "extrapolated": None}
        by_length = {}
        for length, peak in pts:
            by_length.setdefault(length, []).append(peak)
        if len(by_length) >= 2:
            (l0, p0), (l1, p1) = [(n, sum(v) / len(v)) for n, v in sorted(by_length.items())[-2:]]
            slope = (p1 - p0) / (l1 - l0)
            if slope > 0:
                entry["extrapolated"] = int(l1 + (cap_bytes - p1) / slope)
        best[key] = entry
    return best


def environment(device: str, malloc: str) -> dict:
    import torch
    import transformers

    env = {"date": datetime.date.today().isoformat(), "device": device, "machine": platform.machine(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "malloc": malloc,
           "malloc_library": find_library(malloc) if malloc in LIBRARIES else None}
    try:
        import trl

        env["trl"] = trl.__version__
    except ImportError:
        env["trl"] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["load_average_start"] = os.getloadavg()
    except OSError:
        pass
    return env


# ---- report ------------------------------------------------------------------------------------------------
def _gb(n) -> str:
    return "–" if n is None else f"{n / 1e9:.2f}"


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _title(setting: tuple) -> str:
    mix, gradient_checkpointing, lora = setting
    return f"{mix}, gradient checkpointing {'on' if gradient_checkpointing else 'off'}{', LoRA' if lora else ''}"


def _peaks(record: dict) -> str:
    """The process's peak and the live tensors' peak of a case, with their ratio (– where not measured)."""
    if record.get("process_peak_bytes") is None:
        return ""
    ratio = record.get("process_over_live")
    return (f"{_gb(record['process_peak_bytes'])} / {_gb(record.get('live_peak_bytes'))} GB"
            + (f" ({ratio:.2f}x)" if ratio else "") + "; ")


def markdown(doc: dict) -> str:
    records = [r for r in doc["cases"] if r.get("status") == "ok"]
    cuda = doc["environment"]["device"] == "cuda"
    lines = [f"# Long sequences: one training step, {doc['model_name']}",
             "", f"{doc['environment']['date']}, {doc['environment']['device']}, "
             f"{doc['environment']['cpus']} CPUs, malloc {doc['environment']['malloc']}; "
             + ("process peak = `max_memory_reserved` (what the caching allocator holds from the GPU), live peak = "
                "`max_memory_allocated`" if cuda else
                "process peak = the process's resident set at its highest, from its start to the end of the measured "
                "steps (what `top` and the out-of-memory killer see), live peak = the tensors alive at a step's worst "
                "moment (the model, reference and optimiser state included)")
             + " (GB, and the first over the second); extra = the step's peak over the model, reference and "
             "optimiser state (GB), and its ratio to the floor in order and to TRL's extra; floor from the config "
             "(`memory_floor`: the sum of its parts, and in the backward's order); time = median step seconds.", ""]
    for setting in _settings(doc, records):
        rows = [r for r in records if _setting_of(r) == setting]
        systems = [s for s in doc["systems"] if any(r["system"] == s for r in rows)]
        peaks = "process / live peak; " if any(r.get("process_peak_bytes") is not None for r in rows) else ""
        lines += [f"## {_title(setting)}", "",
                  "| L | floor: sum / in order | " + " | ".join(f"{s} {peaks}extra / time" for s in systems) + " |",
                  "|---|---|" + "---|" * len(systems)]
        for length in sorted({r["length"] for r in rows}):
            at = {r["system"]: r for r in rows if r["length"] == length}
            unshared = [r for r in at.values() if one_process_unshared(r["system"])]
            floor = (f"{_gb(unshared[0]['floor_bytes'])} / {_gb(unshared[0]['floor_in_order_bytes'])} GB"
                     if unshared else "–")
            trl = at.get("trl")
            cells = [_peaks(at[s])
                     + f"{_gb(at[s]['extra_bytes'])} GB ({_ratio(at[s]['extra_over_floor_in_order'])} floor"
                     + (f", {at[s]['extra_bytes'] / trl['extra_bytes']:.2f}x TRL" if trl and s != "trl" else "")
                     + f") / {at[s]['step_seconds']:.1f} s" if s in at else "–" for s in systems]
            lines.append(f"| {length} | {floor} | " + " | ".join(cells) + " |")
        lines.append("")
    growing = [r for r in doc["cases"]
               if len(r.get("steps_measured", [])) >= 3 and r.get("process_peak_growth") is not None]
    if growing:
        lines += ["The process peak over a run, from the first measured step to the last:", ""]
        lines += [f"- {r['key']}: {_gb(r['steps_measured'][0]['process_peak_bytes'])} GB after step "
                  f"{r['warmup'] + 1}, {_gb(r['process_peak_bytes'])} GB after step "
                  f"{r['warmup'] + len(r['steps_measured'])} ({100 * r['process_peak_growth']:+.1f} %)"
                  + (f"; {r['status']} before step {r['warmup'] + r['steps']}" if r["status"] != "ok" else "")
                  for r in growing]
        lines.append("")
    failed = [r for r in doc["cases"] if r.get("status") != "ok"]
    if failed:
        lines += ["Cases that did not finish:", ""] + [
            f"- {r['key']}: {r['status']} ({r.get('error')})" + (
                f"; {len(r['steps_measured'])} steps measured, process peak {_gb(r['process_peak_bytes'])} GB"
                if r.get("steps_measured") else "") for r in failed]
        lines.append("")
    cap = doc["cap_bytes"]
    lines += [f"Longest L whose whole peak (model, reference, optimiser state and the step) fits {cap / 1e9:g} GB: "
              "measured; extrapolated along the line through the peaks at the two longest lengths:", ""]
    for key, value in doc["longest_within_cap"].items():
        extrapolated = value["extrapolated"]
        lines.append(f"- {key}: {value['measured'] if value['measured'] is not None else 'none measured'}; "
                     f"{'~' + str(extrapolated) if extrapolated else 'not extrapolated'}")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in doc["cases"] if r.get("status") == "ok"]
    panels = _settings(doc, records)
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, setting in zip(axes[0], panels):
        rows = [r for r in records if _setting_of(r) == setting]
        for system in doc["systems"]:
            pts = sorted((r["length"], r["extra_bytes"] / 1e9) for r in rows if r["system"] == system)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=system, color=f"C{doc['systems'].index(system)}")
        unshared = [r for r in rows if one_process_unshared(r["system"])]
        for key, style, label in (("floor_bytes", "k--", "floor, sum (unshared)"),
                                  ("floor_in_order_bytes", "k:", "floor in order (unshared)")):
            floor = sorted({(r["length"], r[key] / 1e9) for r in unshared if r.get(key)})
            if floor:
                ax.plot(*zip(*floor), style, marker="_", label=label)
        ax.set(title=_title(setting),
               xlabel="L (tokens per sequence)",
               ylabel="extra memory of one step (GB)", xscale="log", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(doc: dict, json_path: Path) -> None:
    write_json(doc, str(json_path))
    json_path.with_suffix(".md").write_text(markdown(doc))
    plot(doc, json_path.with_suffix(".png"))


# ---- command line ------------------------------------------------------------------------------------------
def _usage_error(message: str):
    print(f"long_sequence: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        _usage_error(message)


def _names(text: str, allowed, flag: str, shown=None) -> list[str]:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        _usage_error(f"{flag}: unknown {', '.join(bad) or repr(text)}; choose from {', '.join(shown or allowed)}")
    return names


def _lengths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        _usage_error(f"--lengths: comma-separated integers expected, got {text!r}")
    if not values or min(values) < 8:
        _usage_error(f"--lengths: each at least 8 tokens, got {text!r}")
    return values


def _appended(earlier: dict, new: dict) -> dict:
    """``earlier`` with ``new``'s grid added (the same model and allocator, or the numbers would not compare)."""
    for key in ("model", "model_config"):
        if earlier[key] != new[key]:
            _usage_error(f"--append: that file measured another {key.replace('_', ' ')} ({earlier[key]!r})")
    if earlier["environment"]["malloc"] != new["environment"]["malloc"]:
        _usage_error(f"--append: that file was measured with --malloc {earlier['environment']['malloc']}")
    for key in ("systems", "mixes", "lengths", "gradient_checkpointing"):
        earlier[key] = [*earlier[key], *(v for v in new[key] if v not in earlier[key])]
    earlier["cap_bytes"] = new["cap_bytes"]
    earlier.setdefault("appended", []).append(new["environment"])
    return earlier


def tiny_model(folder: Path) -> str:
    """A small random Llama with SmolLM2's tokenizer shape of things (GQA, tied head), saved for every system."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from upo.train.data.tokenizer import hf_byte_tokenizer

    if not (folder / "config.json").exists():
        config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             max_position_embeddings=4096, attn_implementation="sdpa")
        LlamaForCausalLM(config).save_pretrained(folder)
        hf_byte_tokenizer().save_pretrained(folder)
    return str(folder)


def main(argv=None) -> int:
    p = _Parser(prog="python -m benchmarks.long_sequence", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="any model upo-train takes (default: smollm2)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"of {', '.join(SYSTEMS)} (and upo-train-cpN, "
                   "upo-train-shared-cpN: see --cp)")
    p.add_argument("--mixes", default=",".join(DEFAULT_MIXES),
                   help=f"of {', '.join(MIXES)} (prompt, response shares; default: {','.join(DEFAULT_MIXES)})")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="L, tokens per sequence")
    p.add_argument("--checkpointing", default="on,off", help="gradient checkpointing: on, off or on,off")
    p.add_argument("--max-length-without-checkpointing", type=int, default=1024,
                   help="skip L above this without checkpointing (default: 1024)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (rank 8, every linear layer) instead of "
                   "every weight: the step's memory is then its activations")
    p.add_argument("--cp", type=int, default=1, metavar="N",
                   help="also upo-train --cp N under torchrun, N processes splitting each sequence (systems "
                   "upo-train-cpN and upo-train-shared-cpN; a case's figures are its worst rank's); default 1: none")
    p.add_argument("--warmup", type=int, default=1, help="steps before the measured ones (default: 1)")
    p.add_argument("--steps", type=int, default=1, help="measured steps per case (default: 1)")
    p.add_argument("--cap-gb", type=float, default=DEFAULT_CAP_GB, help="memory cap of the headline (default: 8)")
    p.add_argument("--malloc", choices=MALLOCS, default="mmap",
                   help="CPU: mmap = MALLOC_MMAP_THRESHOLD_=65536 (the RSS follows what is alive), default = glibc's, "
                   "tcmalloc or jemalloc preloaded as upo-train's --allocator does")
    p.add_argument("--timeout", type=float, default=900, help="seconds per case (default: 900)")
    p.add_argument("--dry-run", action="store_true",
                   help="every system once on a tiny Llama (prompt-heavy, L = 24, checkpointing on): seconds")
    p.add_argument("--out", help="output folder (default: $OUT, else ./bench-results)")
    p.add_argument("--render", metavar="JSON", help="rewrite the .md and .png of an earlier result and stop")
    p.add_argument("--append", metavar="JSON", help="add this grid's cases to an earlier result (same model and "
                   "--malloc), skipping those it has")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.case:
        run_case(Case(**json.loads(args.case)), Path(args.result))
        return 0
    if args.render:
        path = Path(args.render)
        doc = json.loads(path.read_text())
        add_floors(doc["cases"], doc["model_config"])  # the floor as this file computes it now
        doc["longest_within_cap"] = longest_within(doc["cases"], doc["cap_bytes"])
        write_report(doc, path)
        return 0

    import torch

    if args.malloc in LIBRARIES and find_library(args.malloc) is None:
        _usage_error(f"--malloc {args.malloc}: no lib{args.malloc} on this system (apt-get install "
                     f"{INSTALL[args.malloc][0]})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    named_cp = [name.format(n) for n in range(2, 65) for name in CONTEXT_PARALLEL_SYSTEMS]  # upo-train-cp2, ...
    systems = _names(args.systems, SYSTEMS + tuple(named_cp), "--systems", shown=SYSTEMS)
    if args.cp < 1:
        _usage_error(f"--cp {args.cp}: an integer >= 1 expected (the processes of one sequence)")
    if args.cp > 1:
        systems += [name.format(args.cp) for name in CONTEXT_PARALLEL_SYSTEMS if name.format(args.cp) not in systems]
    mixes = _names(args.mixes, tuple(MIXES), "--mixes")
    checkpointing = [v == "on" for v in _names(args.checkpointing, ("on", "off"), "--checkpointing")]
    lengths = _lengths(args.lengths)
    folder = Path(out_dir(args.out))
    model = args.model
    if args.dry_run:
        model = tiny_model(folder / "tiny-model")
        lengths, mixes, checkpointing, args.warmup, args.steps = [24], ["prompt_heavy"], [True], 1, 1
    if "trl" in systems or any(s.startswith("upotrainer") for s in systems):
        try:
            import trl  # noqa: F401
        except ImportError:
            print("long_sequence: TRL is not installed: its systems are skipped", file=sys.stderr)
            systems = [s for s in systems if s.startswith("upo-train")]
    cases = [c for c in grid(systems, mixes, lengths, checkpointing, model, device, args.warmup, args.steps, args.lora)
             if c.gradient_checkpointing or c.length <= args.max_length_without_checkpointing]
    doc = {"schema": SCHEMA_VERSION, "model_name": args.model if not args.dry_run else "tiny Llama (dry run)",
           "model": model, "systems": systems, "mixes": mixes, "lengths": lengths,
           "gradient_checkpointing": checkpointing, "cap_bytes": args.cap_gb * 1e9,
           "environment": environment(device, args.malloc), "cases": []}
    config = model_config(model)
    doc["model_config"] = {k: config.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "num_key_value_heads", "head_dim",
                                                       "vocab_size", "tie_word_embeddings")}
    json_path = folder / f"long-sequence{'-dry-run' if args.dry_run else ''}-{doc['environment']['date']}.json"
    if args.append:
        json_path, doc = Path(args.append), _appended(json.loads(Path(args.append).read_text()), doc)
        cases = [c for c in cases if c.key not in {r["key"] for r in doc["cases"] if r.get("status") == "ok"}]
    for n, case in enumerate(cases, 1):
        started = time.perf_counter()
        record = run_in_process(case, args.malloc, args.timeout)
        record["wall_seconds"] = time.perf_counter() - started
        doc["cases"].append(record)
        add_floors(doc["cases"], config)
        doc["longest_within_cap"] = longest_within(doc["cases"], doc["cap_bytes"])
        write_report(doc, json_path)  # after every case: a stopped grid keeps what it measured
        extra = (f"process peak {_gb(record.get('process_peak_bytes'))} GB, live peak "
                 f"{_gb(record.get('live_peak_bytes'))} GB, extra {_gb(record.get('extra_bytes'))} GB, "
                 f"{record.get('step_seconds', 0):.1f} s/step"
                 if record["status"] == "ok" else record["status"] + ": " + str(record.get("error")))
        print(f"[{n}/{len(cases)}] {case.key}: {extra} ({record['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(json_path)
    return 0 if all(r["status"] == "ok" for r in doc["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
