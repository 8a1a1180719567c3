"""``--config FILE``: values parsed as the flags parse them, YAML booleans, TRL DPOConfig names, errors that
name the file, the line and the key (issue 11, item 5)."""
import json

import pytest

from upo.train.cli import main, parse_config
from upo.train.config import build_config
from upo.train.config_file import TRL_ALIASES
from upo.train.errors import UserError


def config_from(tmp_path, text, *flags, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return parse_config(["--config", str(path), *flags])


def test_yaml_strings_are_parsed_like_flags(tmp_path):
    # PyYAML reads 5e-4 as a string (YAML 1.1 floats need a dot): it must still be a float.
    config = config_from(tmp_path, "lr: 5e-4\nbeta: '0.2'\nbatch_size: '4'\nmax_steps: 7\nloss_weights: [1, '0.5']\n"
                         "loss_type: [sigmoid, upo]\n")
    assert (config.lr, config.beta, config.batch_size, config.max_steps) == (5e-4, 0.2, 4, 7)
    assert config.loss_weights == [1.0, 0.5] and config.loss_type == ["sigmoid", "upo"]


@pytest.mark.parametrize("text, on", [
    ('packing: "false"', False), ("packing: 'off'", False), ("packing: no", False), ("packing: False", False),
    ('packing: "true"', True), ("packing: yes", True), ("packing: on", True), ("packing: 'Y'", True),
])
def test_yaml_booleans_quoted_or_not(tmp_path, text, on):
    assert config_from(tmp_path, text + "\n").packing is on


def test_negative_flags_and_settings(tmp_path):
    assert config_from(tmp_path, "no_progress: true\n").progress is False
    assert config_from(tmp_path, "progress: false\n").progress is False
    assert config_from(tmp_path, "no-progress: off\n").progress is True


def test_null_keeps_the_default_and_flags_win(tmp_path):
    config = config_from(tmp_path, "max_steps: null\nlr: 0.5\nbatch_size: 5\n", "--batch-size", "3")
    assert config.max_steps is None and config.lr == 0.5 and config.batch_size == 3


def test_trl_dpo_config_names(tmp_path, monkeypatch):
    text = ("learning_rate: 5.0e-7\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 4\n"
            "num_train_epochs: 2\nmax_length: 256\nmax_prompt_length: 64\nmax_completion_length: 100\nbeta: 0.05\n"
            "loss_type: [sigmoid, upo]\nloss_weights: [1.0, 0.5]\nprecompute_ref_log_probs: true\npadding_free: true\n"
            "seed: 7\nbf16: true\nlr_scheduler_type: cosine\noptim: adamw_torch\nsave_steps: 20\nsave_total_limit: 3\n"
            "truncation_mode: keep_start\ndisable_tqdm: true\nmodel_name_or_path: org/model\nuse_peft: yes\n"
            "dtype: bfloat16\n")
    monkeypatch.setenv("WORLD_SIZE", "2")  # per-device batch x processes = our global batch
    c = config_from(tmp_path, text)
    assert (c.lr, c.batch_size, c.grad_accum, c.epochs, c.max_length, c.max_prompt_length) == (5e-7, 4, 4, 2.0, 256, 64)
    assert (c.max_completion_length, c.beta, c.loss_type, c.loss_weights) == (100, 0.05, ["sigmoid", "upo"], [1.0, 0.5])
    assert (c.precompute_ref, c.packing, c.seed, c.precision, c.lr_scheduler, c.optimizer) == (
        True, True, 7, "bf16", "cosine", "adamw")
    assert (c.save_every, c.keep_checkpoints, c.truncation, c.progress, c.model, c.lora) == (
        20, 3, "keep_start", False, "org/model", True)
    assert c.model_dtype == "bf16"
    assert set(TRL_ALIASES) <= set(text.replace(":", " ").split()) | {
        "eval_steps", "resume_from_checkpoint", "dataset_name", "dataset_train_split", "dataset_test_split"}


def test_json_config_file(tmp_path):
    config = config_from(tmp_path, json.dumps({"learning_rate": "1e-3", "packing": "no",
                                               "model_config": {"hidden_size": 32}}), name="run.json")
    assert (config.lr, config.packing, json.loads(config.model_config)) == (1e-3, False, {"hidden_size": 32})


@pytest.mark.parametrize("text, fragments", [
    ("lr: 1e-3\nbatch_size: four\n", ["run.yaml line 2: batch_size:", "--batch-size: invalid int value: 'four'"]),
    ("optimizer: adam\n", ["run.yaml line 1: optimizer:", "--optimizer: invalid choice: 'adam'"]),
    ("packing: maybe\n", ["run.yaml line 1: packing: expected true or false", "'maybe'"]),
    ("\nwarmup_steps: -5\n", ["run.yaml line 2 (warmup_steps): --warmup-steps must be an integer >= 0, got -5"]),
    ("learning_rate: -1\n", ["run.yaml line 1 (learning_rate): --lr must be a finite number > 0"]),
    ("lr: .inf\n", ["run.yaml line 1 (lr): --lr must be a finite number > 0, got inf"]),
    ("beta: 0.1\nbetta: 0.3\n", ["run.yaml line 2: betta: unknown setting (did you mean beta?)"]),
    ("lr: 0.1\nlearning_rate: 0.2\n", ["run.yaml line 2: learning_rate sets lr, which lr already sets"]),
    ("beta: 0.1\nbeta: 0.2\n", ["run.yaml line 2: beta is given twice (also line 1)"]),
    ("batch_size: [1, 2]\n", ["run.yaml line 1: batch_size: --batch-size takes one value, got a list"]),
    ("loss_type: sigmoid\naux_reward: [length:1]\n", ["run.yaml line 2 (aux_reward): --aux-reward only applies"]),
    ("loss_type: ipo\ndesirable_weight: 2\n", ["run.yaml line 2 (desirable_weight): --desirable-weight only applies"]),
    ("config: other.yaml\n", ["cannot name another config file"]),
    ("- lr\n", ["must hold a mapping of settings"]),
    ("lr: [unclosed\n", ["cannot parse it"]),
])
def test_config_file_mistakes_are_one_line_errors_naming_file_line_and_key(tmp_path, capsys, text, fragments):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["--config", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("upo-train: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_flags_and_file_share_one_message(tmp_path, capsys):
    main(["--batch-size", "four"])
    from_flag = capsys.readouterr().err.strip()
    (tmp_path / "run.yaml").write_text("batch_size: four\n")
    main(["--config", str(tmp_path / "run.yaml")])
    from_file = capsys.readouterr().err.strip()
    assert from_flag == "upo-train: error: argument --batch-size: invalid int value: 'four'"
    assert from_file.endswith(from_flag[len("upo-train: error: "):])


@pytest.mark.parametrize("flags", [
    {"loss_type": ["sigmoid"]},  # aux_reward, upo_lambda ... are saved at their defaults without upo
    {"loss_type": ["sigmoid", "upo"], "upo_lambda": 0.5, "aux_reward": ["length:-1"], "beta_aux": "auto"},
    {"loss_type": ["kto"], "desirable_weight": 1.5, "model_config": '{"hidden_size": 32}', "lr": 1e-4},
], ids=["sigmoid", "upo", "kto"])
def test_the_config_json_a_run_writes_reproduces_it(tmp_path, flags):
    """Issue 34: a run's config.json (every setting, TrainConfig.to_dict, as the trainer writes it) given back as
    --config is the same configuration; it was refused because settings of losses the run did not use are saved."""
    config = build_config({}, {**flags, "max_steps": 3, "output_dir": str(tmp_path / "out")})
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    again = parse_config(["--config", str(tmp_path / "config.json")])
    assert again.to_dict() == config.to_dict()
    assert again.config_file == str(tmp_path / "config.json") and "config_file" not in again.to_dict()


def test_missing_config_file():
    with pytest.raises(UserError, match="--config: file not found"):
        parse_config(["--config", "/nonexistent/run.yaml"])
