"""A Hugging Face causal LM read as "the hidden states its LM head consumes + a linear head description".

    describe_lm_head(model)      -> LMHead: hidden_states(...), weight_and_bias(dtype), logit_options
    check_lm_head(model, ids)    the fused path vs the model's own log_softmax(logits) on a small slice
    causal_lm_logprobs(model, input_ids, labels=None, ...)   -> [B, T-1] log-probs, logits never formed
    decoder_layers(model)        the decoder layers (what FSDP shards one by one)

How a model is read, which transforms are handled and what is refused: docs/models.md.
Nothing here imports transformers; ``peft`` is imported only when a head is one of its wrappers.
"""
from upo.heads.check import check_lm_head
from upo.heads.describe import LMHead, describe_lm_head
from upo.heads.errors import LogitCheckError, UnsupportedModelError, model_name, unwrap
from upo.heads.layers import decoder_layers
from upo.heads.logprobs import causal_lm_logprobs

__all__ = ["LMHead", "LogitCheckError", "UnsupportedModelError", "causal_lm_logprobs", "check_lm_head",
           "decoder_layers", "describe_lm_head", "model_name", "unwrap"]
