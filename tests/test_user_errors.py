"""Every user mistake is one line ``upo-train: error: ...`` naming the argument, file and line, with exit
status 2, never a traceback (issue 11, items 7-9); and what a run reports about its data (items 10, 11)."""
import json
import os
import socket
from types import SimpleNamespace

import pytest
import torch

from train_helpers import MICRO, assert_one_line_error, micro_args, run_main, write_jsonl
from helpers import MICRO_MODEL, one_thread  # noqa: F401  (fixture used by pytestmark)
from upo.train.data import default_dataset_path

pytestmark = pytest.mark.usefixtures("one_thread")
GOOD_LINES = default_dataset_path().read_text(encoding="utf-8").splitlines(keepends=True)[:30]


def dataset(tmp_path, name, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


# ------------------------------------------------------------------ data files (items 7, 8)
def test_non_utf8_jsonl(tmp_path, capsys):
    data = dataset(tmp_path, "d.jsonl", "".join(GOOD_LINES[:5]).encode() + b'{"prompt": "caf\xe9"}\n')
    code, _, err = run_main(micro_args(tmp_path, "--dataset", data), capsys)
    assert_one_line_error(code, err, "d.jsonl line 6: not UTF-8 text (byte 0xe9")


def test_jsonl_line_that_is_not_an_object(tmp_path, capsys):
    data = dataset(tmp_path, "d.jsonl", "".join(GOOD_LINES[:20]) + "\n[1, 2]\n")
    code, _, err = run_main(micro_args(tmp_path, "--dataset", data), capsys)
    assert_one_line_error(code, err, "d.jsonl line 22: expected a JSON object", "got list")


def test_broken_jsonl_line_is_reported_at_its_true_line(tmp_path, capsys):
    # Line 21 of the file (a blank line 10 is still a line), not "line 2" of the record's own text.
    lines = GOOD_LINES[:9] + ["\n"] + GOOD_LINES[9:19] + ['{"prompt": "x", "chosen": \n']
    data = dataset(tmp_path, "d.jsonl", "".join(lines))
    code, _, err = run_main(micro_args(tmp_path, "--dataset", data), capsys)
    assert_one_line_error(code, err, "d.jsonl line 21: invalid JSON")


def test_chat_message_without_role(tmp_path, capsys):
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "assistant", "content": "Greetings."}]}] * 6
    rows.append({**rows[0], "chosen": [{"content": "no role"}]})
    code, _, err = run_main(micro_args(tmp_path, "--dataset", write_jsonl(tmp_path / "chat.jsonl", rows)), capsys)
    assert_one_line_error(code, err, "chat.jsonl line 7", "message 0 of 'chosen' has no 'role'")


@pytest.mark.parametrize("content", [b"", b"PAR1 truncated"], ids=["empty", "truncated"])
def test_empty_or_truncated_parquet(tmp_path, capsys, content):
    data = dataset(tmp_path, "d.parquet", content)
    code, _, err = run_main(micro_args(tmp_path, "--dataset", data), capsys)
    assert_one_line_error(code, err, "d.parquet: not a readable Parquet file")


def test_json_record_that_is_not_an_object(tmp_path, capsys):
    data = dataset(tmp_path, "d.json", json.dumps([json.loads(GOOD_LINES[0]), "text"]))
    code, _, err = run_main(micro_args(tmp_path, "--dataset", data), capsys)
    assert_one_line_error(code, err, "d.json record 1: expected a JSON object")


# ------------------------------------------------------------------ dataset folders and hub ids (issue 34)
def test_a_dataset_folder_with_a_broken_file_names_the_file_and_line(tmp_path, capsys):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(GOOD_LINES[:5]))
    (folder / "b.jsonl").write_text(GOOD_LINES[0] + '{"prompt": "x", "chosen": "y"\n')
    code, _, err = run_main(micro_args(tmp_path, "--dataset", str(folder)), capsys)
    # alone=False: datasets prints its own progress lines before failing
    assert_one_line_error(code, err, f"dataset folder {folder}: {folder / 'b.jsonl'} line 2: invalid JSON", alone=False)


def test_an_empty_dataset_folder_says_what_was_expected(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(micro_args(tmp_path, "--dataset", str(tmp_path / "empty")), capsys)
    assert_one_line_error(code, err, f"dataset folder {tmp_path / 'empty'} (split train): datasets could not read it",
                          "expected a folder written by save_to_disk, or data files", alone=False)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network (the Hub's host does not resolve), an empty cache, and every request ``datasets`` would make
    recorded and failed: the tests below make none."""
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import constants

    def no_name_resolution(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    requests = []

    def request(*args, **kwargs):
        requests.append(args)
        raise ConnectionError("a request to the Hub")

    monkeypatch.setattr(socket, "getaddrinfo", no_name_resolution)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(datasets, "load_dataset", request)
    monkeypatch.setattr(datasets, "get_dataset_split_names", request)
    return SimpleNamespace(datasets=datasets, requests=requests, cache=tmp_path / "datasets-cache")


@pytest.mark.parametrize("flag", ["--dataset", "--eval-dataset"])
def test_a_hub_dataset_without_network_is_refused_at_once(tmp_path, capsys, offline_hub, flag):
    """Issue 34: not a local path, not cached, the Hub unreachable: one line at once, not 30 s of retries."""
    code, _, err = run_main(micro_args(tmp_path, flag, "no-such/dataset"), capsys)
    assert_one_line_error(code, err, "dataset 'no-such/dataset' is neither a local file or folder nor in the Hugging "
                          "Face cache, and the Hub (huggingface.co) cannot be reached (no network)")
    assert offline_hub.requests == []


def test_a_hub_dataset_in_offline_mode_is_refused_at_once(tmp_path, capsys, offline_hub, monkeypatch):
    monkeypatch.setattr(offline_hub.datasets.config, "HF_HUB_OFFLINE", True)
    code, _, err = run_main(micro_args(tmp_path, "--dataset", "no-such/dataset"), capsys)
    assert_one_line_error(code, err, "nor in the Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE)")
    assert offline_hub.requests == []


def test_a_cached_hub_dataset_is_still_loaded_without_network(tmp_path, capsys, offline_hub):
    (offline_hub.cache / "some___dataset").mkdir(parents=True)  # datasets' cache of some/dataset
    code, _, err = run_main(micro_args(tmp_path, "--dataset", "some/dataset"), capsys)
    assert_one_line_error(code, err, "could not load dataset 'some/dataset' (split train): a request to the Hub")
    assert offline_hub.requests  # handed to datasets, which reads its cache


# ------------------------------------------------------------------ flags (items 7, 9)
@pytest.mark.parametrize("flags, fragment", [
    (["--aux-reward", "lexicon:/nonexistent:1"], "bad --aux-reward lexicon:/nonexistent:1: lexicon '/nonexistent'"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--lora", "--lora-r", "0"], "--lora-r must be an integer >= 1, got 0"),
    (["--loss-weights", "1", "nan"], "--loss-weights must be finite numbers"),
    (["--upo-lambda", "nan"], "--upo-lambda must be a finite number, got nan"),
    (["--device", "mps"], "--device mps: no mps device on this machine"),
    (["--max-length", "1"], "--max-length must be an integer >= 2, got 1"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--epochs", "0"], "--epochs must be a finite number > 0"),
    (["--epochs", "-1"], "--epochs must be a finite number > 0"),
    (["--max-examples", "-5"], "--max-examples must be an integer >= 1, got -5"),
    (["--warmup-steps", "-5"], "--warmup-steps must be an integer >= 0, got -5"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be an integer >= 1, got -1"),
    (["--max-skipped-batches", "-1"], "--max-skipped-batches must be an integer >= 0"),
    (["--eval-max-pairs", "0"], "--eval-max-pairs must be an integer >= 1"),
    (["--model-config", json.dumps({**MICRO_MODEL, "hiden_size": 8})], "unknown LlamaConfig setting(s): hiden_size"),
    (["--model-config", json.dumps({**MICRO_MODEL, "hidden_size": 30, "num_attention_heads": 4})],
     "hidden size (30) is not a multiple of the number of attention heads (4)"),
    (["--loss-type", "sigmoid", "--aux-reward", "length:1"], "--aux-reward only applies with 'upo' in --loss-type"),
    (["--loss-type", "ipo", "--upo-lambda", "2"], "--upo-lambda only applies with 'upo'"),
    (["--overwrite", "--resume", "auto"], "--overwrite starts the run over and --resume continues it"),
    # issue 34: an empty path (an unset shell variable) is not the default data, model or folder
    (["--dataset", ""], "--dataset is empty: give a path or a name"),
    (["--eval-dataset", " "], "--eval-dataset is empty"),
    (["--output-dir", ""], "--output-dir is empty"),
    (["--model", ""], "--model is empty"),
])
def test_bad_values_are_one_line_errors(tmp_path, capsys, flags, fragment):
    code, _, err = run_main(micro_args(tmp_path, *flags), capsys)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("rank, says_it", [("0", True), ("1", False)])
def test_a_flag_mistake_under_torchrun_is_said_by_rank_0_only(tmp_path, capsys, monkeypatch, rank, says_it):
    """Every rank parses the same flags: the terminal shows the line once, every rank exits 2."""
    import upo.train.cli as cli

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(cli, "MAIN_REPORTS_WITHIN_S", 0.0)
    code, _, err = run_main(micro_args(tmp_path, "--beta", "many"), capsys)
    assert code == 2
    if says_it:
        assert_one_line_error(code, err, "--beta")
    else:
        assert err == ""


def test_triton_backend_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' own interpreter mode
    code, _, err = run_main([a if a != "torch" else "triton" for a in micro_args(tmp_path)], capsys)
    assert_one_line_error(code, err, "--backend triton needs a CUDA device (this run is on cpu)")


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    code, _, err = run_main(micro_args(tmp_path), capsys)
    assert_one_line_error(code, err, "--output-dir", "is a file, not a folder")


def test_output_dir_that_is_not_writable(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes anywhere a mode allows; sysfs refuses even root
        target = "/sys/upo-train-test-out"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = str(tmp_path / "ro" / "out")
    args = micro_args(tmp_path)
    args[args.index("--output-dir") + 1] = target
    code, _, err = run_main(args, capsys)
    assert_one_line_error(code, err, f"--output-dir {target}: cannot create it")


# ------------------------------------------------------------------ checkpoints and caches (item 7)
def test_resuming_with_another_model_config(tmp_path, capsys):
    assert run_main(micro_args(tmp_path), capsys)[0] == 0
    other = json.dumps({**MICRO_MODEL, "hidden_size": 16, "intermediate_size": 32})
    args = [a if a != MICRO else other for a in micro_args(tmp_path, "--resume", "auto", "--max-steps", "2")]
    code, _, err = run_main(args, capsys)
    assert_one_line_error(code, err, "checkpoint-000001.pt does not fit this run: size mismatch",
                          "resume with the --model, --model-config and --lora settings", alone=False)


def test_checkpoint_missing_keys(tmp_path, capsys):
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    torch.save({"step": 1, "model": {}}, tmp_path / "out" / "checkpoints" / "checkpoint-000001.pt")
    code, _, err = run_main(micro_args(tmp_path, "--resume", "auto", "--max-steps", "2"), capsys)
    assert_one_line_error(code, err, "checkpoint-000001.pt lacks position, optimizer, scheduler, rng")


def test_damaged_reference_cache_is_recomputed(tmp_path, capsys):
    assert run_main(micro_args(tmp_path, "--precompute-ref"), capsys)[0] == 0
    (cache,) = (tmp_path / "out" / "ref_logps").glob("*.pt")
    expected = torch.load(cache, weights_only=True)
    cache.write_bytes(cache.read_bytes()[:40])  # a write cut short
    code, _, err = run_main(micro_args(tmp_path, "--precompute-ref", "--overwrite"), capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "are unreadable or lack what this run needs: computing them again" in err
    assert torch.equal(torch.load(cache, weights_only=True)["chosen"], expected["chosen"])


def test_half_written_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    assert run_main(micro_args(tmp_path, "--max-steps", "2"), capsys)[0] == 0
    metrics = tmp_path / "out" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 0.6')  # killed mid-write
    code, _, err = run_main(micro_args(tmp_path, "--max-steps", "3", "--resume", "auto"), capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "metrics.jsonl: dropped unreadable line(s) 3" in err
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


# ------------------------------------------------------------------ what the run says about its data (10, 11)
def test_truncation_is_reported_when_every_response_is_cut(tmp_path, capsys):
    code, out, err = run_main(micro_args(tmp_path, "--max-length", "24", "--max-prompt-length", "8"), capsys)
    assert code == 0, err
    assert "note: truncated 8 of 8 prompts to 8 tokens" in err
    assert "the responses of 8 of 8 pairs (--max-length 24) (all of them" in err
    assert "truncated: 8 prompts, 8 responses (of 8 pairs)" in out


def test_evaluation_shows_progress_and_is_bounded(tmp_path, capsys):
    held_out = write_jsonl(tmp_path / "eval.jsonl", [json.loads(line) for line in GOOD_LINES[10:22]])
    args = micro_args(tmp_path, "--eval-dataset", held_out, "--eval-max-pairs", "5")
    args.remove("--no-progress")
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    assert "eval: " in err and "pair" in err  # the evaluation's own progress bar
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["train_pairs"], summary["eval_pairs"]) == (8, 5)  # every --dataset pair trains


def test_a_datasets_own_test_split_is_the_held_out_set(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in GOOD_LINES]
    splits = {"train": datasets.Dataset.from_list(rows[:20]), "test": datasets.Dataset.from_list(rows[20:])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    code, _, err = run_main(micro_args(tmp_path, "--dataset", str(tmp_path / "saved"), "--eval-max-pairs", "4"),
                            capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["train_pairs"], summary["eval_pairs"]) == (8, 4)  # --max-examples 8 of train, 4 of test
