"""upo-train's command line: configuration precedence, outputs, and one-line errors for user mistakes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import upo
from train_helpers import MICRO, assert_one_line_error, micro_args, run_main, subprocess_env, write_jsonl
from helpers import one_thread  # noqa: F401  (fixture used by pytestmark)
from upo.train.cli import parse_config
from upo.train.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ bad input
def test_missing_columns_are_named(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    code, _, err = run_main(micro_args(tmp_path, "--dataset", data), capsys)
    assert_one_line_error(code, err, "missing column(s) chosen, rejected")


def test_empty_response(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "ok", "rejected": ""}] * 4)
    code, _, err = run_main(micro_args(tmp_path, "--dataset", data), capsys)
    assert_one_line_error(code, err, "row 0", "'rejected' response is empty")


def test_missing_dataset(tmp_path, capsys):
    code, _, err = run_main(micro_args(tmp_path, "--dataset", str(tmp_path / "missing.jsonl")), capsys)
    assert_one_line_error(code, err, "dataset not found", "missing.jsonl")


def test_unknown_loss(tmp_path, capsys):
    code, _, err = run_main(micro_args(tmp_path, "--loss-type", "sigmoid", "dpoo"), capsys)
    assert_one_line_error(code, err, "unknown loss type 'dpoo'", "available:")


def test_unknown_reward(tmp_path, capsys):
    code, _, err = run_main(micro_args(tmp_path, "--aux-reward", "clarity:1.0"), capsys)
    assert_one_line_error(code, err, "unknown reward 'clarity'")


def test_missing_reward_column(tmp_path, capsys):
    code, _, err = run_main(micro_args(tmp_path, "--aux-reward", "column:safety:1.0"), capsys)
    assert_one_line_error(code, err, "safety")


@pytest.mark.parametrize("flags, fragment", [
    (["--batch-size", "two"], "--batch-size"),
    (["--baseline", "median"], "--baseline"),
    (["--loss-type", "sigmoid", "upo", "--loss-weights", "1.0"], "--loss-weights"),
    (["--beta", "0"], "--beta"),
    (["--model-config", "{not json"], "--model-config"),
    (["--resume", "/nonexistent/checkpoint-000001.pt"], "checkpoint not found"),
    (["--loss-type", "apo_zero", "--f-divergence-type", "forward_kl"], "f_divergence_type='forward_kl'"),
    (["--f-divergence-type", "kl"], "--f-divergence-type"),
    (["--loss-type", "exo_pair"], "label_smoothing must be > 0"),
    (["--ld-alpha", "1.5"], "--ld-alpha"),
    (["--loss-type", "aot_unpaired", "--use-weighting"], "use_weighting (WPO) is not available"),
    (["--loss-type", "mrpo"], "extra_ref_chosen_logps"),
])
def test_bad_flags(tmp_path, capsys, flags, fragment):
    code, _, err = run_main(micro_args(tmp_path, *flags), capsys)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("flags, flag", [(["--use-weighting"], "--use-weighting"),
                                         (["--ld-alpha", "0.5"], "--ld-alpha")])
def test_per_token_options_train_or_say_which_flag_cannot(tmp_path, capsys, flags, flag):
    """WPO and LD-DPO need per-token data from upo.fused_loss: a run, or one line naming the flag."""
    code, _, err = run_main(micro_args(tmp_path, "--loss-type", "sigmoid", *flags), capsys)
    if code != 0:
        assert_one_line_error(code, err, flag)


def test_missing_model_is_a_user_error(tmp_path, capsys):
    code, _, err = run_main(micro_args(tmp_path, "--model", str(tmp_path / "no-such-model")), capsys)
    assert_one_line_error(code, err, "model not found")


# ------------------------------------------------------------------ configuration
def test_config_file_then_flags(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("beta: 0.3\nlr: 0.01\nloss-type: [ipo, upo]\naux_reward: ['length:-0.1']\n")
    config = parse_config(["--config", str(config_file), "--lr", "0.02"])
    assert (config.beta, config.lr, config.loss_type, config.aux_reward) == (0.3, 0.02, ["ipo", "upo"],
                                                                              ["length:-0.1"])
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"batch_size": 4, "packing": True}))
    config = parse_config(["--config", str(json_file), "--aux-reward", "readability:1", "--aux-reward", "length:-0.1"])
    assert (config.batch_size, config.packing, config.aux_reward) == (4, True, ["readability:1", "length:-0.1"])
    assert parse_config(["--loss-type", "sigmoid,upo"]).loss_type == ["sigmoid", "upo"]


def test_trl_options_reach_the_loss(tmp_path):
    from upo.train.objective import loss_kwargs_from_config

    config_file = tmp_path / "run.yaml"
    config_file.write_text("f-divergence-type: alpha_divergence\nf_alpha_divergence_coef: 0.3\nld_alpha: 0.25\n")
    config = parse_config(["--config", str(config_file), "--use-weighting", "--loss-type", "ipo", "sft"])
    kwargs = loss_kwargs_from_config(config, None)
    assert {key: kwargs[key] for key in ("f_divergence_type", "f_alpha_divergence_coef", "ld_alpha", "use_weighting",
                                         "loss_type")} == {
        "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3, "ld_alpha": 0.25,
        "use_weighting": True, "loss_type": ["ipo", "sft"]}
    defaults = loss_kwargs_from_config(parse_config([]), [1.0])
    assert (defaults["f_divergence_type"], defaults["f_alpha_divergence_coef"], defaults["ld_alpha"],
            defaults["use_weighting"]) == ("reverse_kl", 0.5, None, False)  # TRL 1.16's DPOConfig defaults


def test_unknown_config_key(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("betta: 0.3\n")
    with pytest.raises(UserError, match="line 1: betta: unknown setting .did you mean beta"):
        parse_config(["--config", str(config_file)])


def test_help_lists_the_flags():
    result = subprocess.run([sys.executable, "-m", "upo.train", "--help"], capture_output=True, text=True,
                            env=subprocess_env(), timeout=60)
    assert result.returncode == 0
    for flag in ("--loss-type", "--aux-reward", "--packing", "--precompute-ref", "--resume", "--fsdp", "--lora",
                 "--f-divergence-type", "--f-alpha-divergence-coef", "--ld-alpha", "--use-weighting",
                 "--overwrite", "--max-skipped-batches", "--eval-dataset", "--eval-max-pairs", "learning_rate=lr"):
        assert flag in result.stdout
    help_text = " ".join(result.stdout.split())
    for code in ("130 stopped by SIGINT", "138 stopped by SIGUSR1", "143 stopped by SIGTERM"):
        assert code in help_text


# ------------------------------------------------------------------ a tiny run through main()
def test_main_truncates_long_prompts_and_writes_outputs(tmp_path, capsys):
    rows = [{"prompt": "Why? " * (40 if i % 2 else 1), "chosen": "Because it is.", "rejected": "Insofar as."}
            for i in range(8)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    code, out, err = run_main(micro_args(tmp_path, "--dataset", data, "--max-length", "64", "--eval-fraction",
                                         "0.25", "--truncation", "keep_start"), capsys)
    assert code == 0, err
    assert "truncated: 4 prompts, 0 responses (of 8 pairs)" in out
    output = tmp_path / "out"
    summary = json.loads((output / "summary.json").read_text())
    assert summary["truncated_prompts"] == 4 and summary["steps"] == 1
    assert json.loads((output / "config.json").read_text())["truncation"] == "keep_start"
    record = json.loads((output / "metrics.jsonl").read_text().splitlines()[0])
    assert "eval/rewards/accuracies" in record
    for name in ("plot.png", "checkpoints/checkpoint-000001.pt", "model/config.json"):
        assert (output / name).is_file(), name


def test_conversational_dataset(tmp_path, capsys):
    chat = Path(upo.__file__).parent / "resources" / "preferences_chat_sample.jsonl"
    code, _, err = run_main(micro_args(tmp_path, "--dataset", str(chat), "--packing"), capsys)
    assert code == 0, err


def _save_tiny_pretrained(folder: Path) -> None:
    """A local 'pretrained' model: a byte-level BPE tokenizer with a chat template and a micro Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["plain short sentences"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         **json.loads(MICRO))
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_local_pretrained_model_with_chat_template(tmp_path, capsys):
    _save_tiny_pretrained(tmp_path / "pretrained")
    chat = Path(upo.__file__).parent / "resources" / "preferences_chat_sample.jsonl"
    args = micro_args(tmp_path, "--model", str(tmp_path / "pretrained"), "--dataset", str(chat), "--lr", "1e-3")
    code, _, err = run_main([a for a in args if a != MICRO and a != "--model-config"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "model" / "tokenizer_config.json").is_file()
