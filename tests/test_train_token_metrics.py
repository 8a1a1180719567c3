"""``upo-train`` logs TRL's token metrics (``entropy``, ``mean_token_accuracy``, ``logits/*``) per
step and in evaluation, through the metrics ``upo.fused_loss(token_stats=True)`` returns."""
import math

import pytest

from helpers import one_thread  # noqa: F401  (fixture used by pytestmark)
from test_train import make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")
TOKEN_METRICS = ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected")


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_train_and_eval_log_token_metrics(tmp_path, packing):
    trainer = make_trainer(tmp_path, packing=packing, eval_fraction=0.25)
    step = trainer.train_step()
    evaluation = trainer.evaluate()
    for name in TOKEN_METRICS:
        assert math.isfinite(step[name]) and math.isfinite(evaluation[name]), name
    assert 0.0 < step["entropy"] <= math.log(trainer.module.policy.config.vocab_size) + 1e-4
    assert 0.0 <= step["mean_token_accuracy"] <= 1.0 and 0.0 <= evaluation["mean_token_accuracy"] <= 1.0
