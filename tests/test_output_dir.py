"""One run per ``--output-dir``: a fresh start never mixes with another run's files (refused, or cleared with
``--overwrite``), ``--resume`` continues the run the dir holds, and a lock refuses a second live run
(issue 11, items 1 and 4)."""
import json
import shutil

import pytest

from train_helpers import assert_one_line_error, checkpoint_steps, metrics_rows, micro_args, run_main, write_jsonl
from helpers import one_thread  # noqa: F401  (fixture used by pytestmark)
from upo.train.data import default_dataset_path
from upo.train.run_lock import LOCK_NAME, RunLock

pytestmark = pytest.mark.usefixtures("one_thread")
GOOD_LINES = default_dataset_path().read_text(encoding="utf-8").splitlines()[:30]


def run(tmp_path, capsys, *flags):
    return run_main(micro_args(tmp_path, "--keep-checkpoints", "10", "--save-every", "1", *flags), capsys)


def test_a_new_run_never_mixes_with_an_older_longer_one(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tmp_path, capsys, "--max-steps", "4")[0] == 0
    old_model = (out / "model" / "model.safetensors").read_bytes()

    code, _, err = run(tmp_path, capsys, "--max-steps", "2", "--lr", "0.01")
    assert_one_line_error(code, err, f"--output-dir {out} already holds a run", "checkpoints/ (latest: step 4)",
                          "continue it with --resume auto, or replace it with --overwrite")
    assert checkpoint_steps(out) == [1, 2, 3, 4] and len(metrics_rows(out)) == 4  # untouched
    assert (out / "model" / "model.safetensors").read_bytes() == old_model

    code, _, err = run(tmp_path, capsys, "--max-steps", "2", "--lr", "0.01", "--overwrite")
    assert code == 0, err
    assert "note: --overwrite: removed the previous run" in err
    assert checkpoint_steps(out) == [1, 2] and [r["step"] for r in metrics_rows(out)] == [1, 2]
    new_model = (out / "model" / "model.safetensors").read_bytes()
    assert new_model != old_model
    # --resume auto continues the run the dir holds now, and model/ stays its weights.
    code, _, err = run(tmp_path, capsys, "--max-steps", "2", "--lr", "0.01", "--resume", "auto")
    assert code == 0, err
    assert "resumed from" in err and "checkpoint-000002.pt at step 2" in err
    assert (out / "model" / "model.safetensors").read_bytes() == new_model
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01


def test_resuming_an_earlier_checkpoint_abandons_the_later_ones(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tmp_path, capsys, "--max-steps", "4")[0] == 0
    earlier = str(out / "checkpoints" / "checkpoint-000002.pt")
    code, _, err = run(tmp_path, capsys, "--max-steps", "3", "--resume", earlier)
    assert code == 0, err
    assert "removed 2 later checkpoint(s)" in err
    assert checkpoint_steps(out) == [1, 2, 3]  # step 4 of the abandoned run is gone...
    assert [r["step"] for r in metrics_rows(out)] == [1, 2, 3]
    code, _, err = run(tmp_path, capsys, "--max-steps", "3", "--resume", "auto")
    assert code == 0 and "checkpoint-000003.pt at step 3" in err, err  # ...so auto picks this run's last


def test_resume_auto_restarts_a_run_that_never_reached_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / ".checkpoint-000002.pt.tmp-123").write_bytes(b"half")  # killed while saving
    code, _, err = run(tmp_path, capsys, "--resume", "auto")
    assert code == 0, err
    assert "holds no checkpoint to resume" in err and "starting over" in err
    assert [r["step"] for r in metrics_rows(out)] == [1]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000001.pt"]


def test_resume_auto_refuses_a_finished_run_without_checkpoints(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tmp_path, capsys)[0] == 0
    for path in (out / "checkpoints").iterdir():
        path.unlink()
    code, _, err = run(tmp_path, capsys, "--resume", "auto")
    assert_one_line_error(code, err, "holds a run with no checkpoint to resume", "model/")
    assert (out / "model").is_dir()


def test_resuming_another_dirs_checkpoint_into_a_dir_with_a_run(tmp_path, capsys):
    assert run(tmp_path / "a", capsys)[0] == 0
    assert run(tmp_path, capsys)[0] == 0
    source = tmp_path / "a" / "out" / "checkpoints" / "checkpoint-000001.pt"
    code, _, err = run(tmp_path, capsys, "--resume", str(source), "--max-steps", "2")
    assert_one_line_error(code, err, "holds another run", "would mix the two")


def test_a_live_run_holds_the_lock(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = RunLock(out).acquire()  # as a run in progress holds it
    try:
        code, _, err = run(tmp_path, capsys)
        assert_one_line_error(code, err, f"--output-dir {out} is in use by another upo-train run (pid ",
                              "wait for it to end, or choose another --output-dir")
        assert not (out / "config.json").exists()
    finally:
        lock.release()
    assert run(tmp_path, capsys)[0] == 0  # released: the dir is free again


def test_a_lock_file_left_by_a_dead_run_is_not_a_lock(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("pid 999999 on elsewhere, started long ago\n")  # its process is gone
    code, _, err = run(tmp_path, capsys)
    assert code == 0, err
    assert "pid 999999" not in (out / LOCK_NAME).read_text()


def test_a_failed_start_leaves_the_dir_free(tmp_path, capsys):
    code, _, err = run(tmp_path, capsys, "--dataset", str(tmp_path / "missing.jsonl"))
    assert_one_line_error(code, err, "dataset not found")
    assert run(tmp_path, capsys)[0] == 0  # neither the lock nor run files were left behind


def test_starting_over_never_removes_an_input_of_the_run(tmp_path, capsys):
    """Issue 34: --overwrite (or --resume auto starting over) would remove run files that this very run reads:
    refused in one line before anything is touched, for every input that lies in them."""
    out = tmp_path / "out"
    assert run(tmp_path, capsys)[0] == 0
    model = out / "model"
    weights = (model / "model.safetensors").read_bytes()
    data = write_jsonl(model / "pairs.jsonl", [json.loads(line) for line in GOOD_LINES])
    (tmp_path / "run.json").write_text(json.dumps({"max_examples": 8}))
    (out / "config.json").write_bytes((tmp_path / "run.json").read_bytes())
    cases = [(["--model", str(model)], f"--model {model} is inside {out}/model"),
             (["--ref-model", str(model)], f"--ref-model {model} is inside {out}/model"),
             (["--dataset", data], f"--dataset {data} is inside {out}/model"),
             (["--eval-dataset", data], f"--eval-dataset {data} is inside {out}/model"),
             (["--config", str(out / "config.json")], f"--config {out}/config.json is inside {out}/config.json")]
    for flags, fragment in cases:
        code, _, err = run(tmp_path, capsys, *flags, "--overwrite")
        assert_one_line_error(code, err, fragment, "which --overwrite would remove",
                              f"move it out of --output-dir {out}")
    assert (model / "model.safetensors").read_bytes() == weights and checkpoint_steps(out) == [1]
    # --resume auto starts over a run without checkpoints: the same refusal for the config file it reads
    for path in (out / "checkpoints").iterdir():
        path.unlink()
    for name in ("model", "summary.json", "plot.png"):
        shutil.rmtree(out / name) if name == "model" else (out / name).unlink()
    code, _, err = run(tmp_path, capsys, "--config", str(out / "config.json"), "--resume", "auto")
    assert_one_line_error(code, err, f"--config {out}/config.json is inside", "which --resume auto")
    assert (out / "config.json").read_bytes() == (tmp_path / "run.json").read_bytes()


def test_an_input_in_the_output_dir_but_outside_its_run_files_is_kept(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tmp_path, capsys)[0] == 0
    data = write_jsonl(out / "pairs.jsonl", [json.loads(line) for line in GOOD_LINES])
    code, _, err = run(tmp_path, capsys, "--dataset", data, "--overwrite")
    assert code == 0, err
    assert (out / "pairs.jsonl").is_file() and "removed the previous run" in err
