"""Run under ``torchrun --nproc-per-node 2`` by ``test_trl_integration.py``: ``DPOTrainer`` and
``UPOTrainer`` on the tiny set-up, each process its share of the batch (accelerate over gloo), then
UPO with a value head; rank 0 writes every run's per-step logs to the JSON file ``argv[1]``."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trl_tiny  # noqa: E402  (sets the offline environment before TRL is imported)
from trl import DPOConfig, DPOTrainer  # noqa: E402

from upo.integrations.trl import UPOConfig, UPOTrainer  # noqa: E402

CASES = {"sigmoid": dict(loss_type=["sigmoid"]), "ipo": dict(loss_type=["ipo"])}


def main(path):
    logs = {}
    for name, settings in CASES.items():
        for label, trainer, config in (("dpo", DPOTrainer, DPOConfig), ("upo", UPOTrainer, UPOConfig)):
            run = trl_tiny.run(trainer, config, max_steps=2, ref_seed=1, output_dir=f"/tmp/upo-trl-2p-{label}",
                               **settings)
            logs[f"{name}/{label}"] = run.logs
    run = trl_tiny.run(UPOTrainer, UPOConfig, max_steps=2, loss_type=["sigmoid", "upo"], output_dir="/tmp/upo-trl-2p",
                       trainer_kwargs=dict(aux_reward_funcs=["readability"]))
    logs["sigmoid+upo/upo"] = run.logs
    if int(os.environ.get("RANK", "0")) == 0:
        with open(path, "w") as f:
            json.dump(logs, f)


if __name__ == "__main__":
    main(sys.argv[1])
