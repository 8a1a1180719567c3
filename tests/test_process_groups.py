"""``--tp N`` and ``--cp N`` both form groups of N processes: what they refuse alike (a group size of 0, a process
count the size does not divide, said once by rank 0) and how a DPOConfig's per-device batch counts under them."""
import pytest

from train_helpers import assert_one_line_error, micro_args, run_main

FLAGS = ["--tp", "--cp"]


@pytest.mark.parametrize("flag", FLAGS)
def test_group_size_zero_is_refused(flag, tmp_path, capsys):
    code, _, err = run_main(micro_args(tmp_path, flag, "0"), capsys)
    assert_one_line_error(code, err, f"{flag} must be an integer >= 1")


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("rank", ["0", "1"])
def test_group_size_not_dividing_the_processes_is_one_line_from_rank_0(flag, rank, tmp_path, capsys, monkeypatch):
    """Each rank refuses at once (before the process group or transformers); rank 0 alone prints it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    code, _, err = run_main(micro_args(tmp_path, flag, "3"), capsys)
    if rank == "0":
        assert_one_line_error(code, err, f"{flag} 3: the 2 processes are not a multiple of 3")
    else:
        assert code == 2 and err == ""


@pytest.mark.parametrize("flag", FLAGS)
def test_trl_per_device_batch_is_per_group(flag, tmp_path, monkeypatch):
    """A DPOConfig's per_device_train_batch_size: per model copy under --tp (4 processes / --tp 2 copies), per
    sequence group under --cp (the processes of one sequence share it)."""
    from upo.train.cli import parse_config

    monkeypatch.setenv("WORLD_SIZE", "4")
    path = tmp_path / "run.yaml"
    path.write_text(f"per_device_train_batch_size: 3\n{flag[2:]}: 2\n")
    assert parse_config(["--config", str(path)]).batch_size == 6
    assert parse_config(["--config", str(path), flag, "1"]).batch_size == 12
