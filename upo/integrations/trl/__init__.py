"""UPO inside TRL: ``from upo.integrations.trl import UPOConfig, UPOTrainer`` instead of
``from trl import DPOConfig, DPOTrainer`` (docs/trl.md).

    config.py      UPOConfig (DPOConfig + upo's options) and the checked plan of the loss
    rewards.py     auxiliary rewards: upo's names, GRPO-style callables, dataset columns
    batch.py       TRL's batch read for upo's kernels; the collator that keeps the reward columns
    forward.py     running upo's code inside the model's forward (so DDP/FSDP see it)
    value_head.py  the value head beside the model: attach, save, load
    trainer.py     UPOTrainer: DPOTrainer with log-probs from upo's kernels and the loss from upo
"""
import warnings

try:
    import trl as _trl
except ImportError as err:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        'upo.integrations.trl needs TRL: pip install "upo[trl]" (TRL >= 1.16, < 1.17)'
    ) from err

if not _trl.__version__.startswith("1.16."):
    warnings.warn(f"upo.integrations.trl is tested with TRL 1.16 and found TRL {_trl.__version__}; it overrides "
                  "DPOTrainer internals that change between releases", stacklevel=2)

from upo.integrations.trl.config import UPOConfig  # noqa: E402
from upo.integrations.trl.trainer import UPOTrainer  # noqa: E402
from upo.integrations.trl.value_head import VALUE_HEAD_FILE, load_value_head  # noqa: E402

__all__ = ["VALUE_HEAD_FILE", "UPOConfig", "UPOTrainer", "load_value_head"]
