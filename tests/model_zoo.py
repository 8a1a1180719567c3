"""Every causal-LM architecture of the installed transformers, built tiny from its config (random weights).

``build(model_type)`` -> ``(model, input_ids)`` or raises (the type is then "not buildable"):
sizes shrunk to a few thousand parameters for every key the default config has (MLA, MoE, SSM and
hybrid layouts made consistent), every logit-transform attribute set to a non-trivial value,
1-D parameters perturbed and the LM head rescaled so that logits have a std of ~4 (a soft cap of 5
then really bends them). Nothing is downloaded. The overrides come from the issue-10 survey of
transformers 5.24 (196 types, 190 buildable).
"""
from __future__ import annotations

import math

import torch

H = 64
TINY = {
    "hidden_size": H, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
    "n_group": 1, "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 16, "ffn_hidden_size": 128, "expert_intermediate_size": 32,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "sliding_window": 64, "num_nextn_predict_layers": 0, "index_head_dim": 16, "index_n_heads": 2,
    "num_experts_per_token": 2, "num_expert_group": 1, "moe_num_experts": 4, "moe_k": 2, "moe_topk": 2,
    "moe_intermediate_dim": 32, "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 256,
    "laurel_rank": 8, "num_kv_shared_layers": 0, "altup_num_inputs": 2, "global_head_dim": 16,
    "n_embd": H, "n_layer": 2, "n_head": 4, "n_positions": 128, "n_inner": 128, "n_ctx": 128,
    "num_layers": 2, "num_heads": 4, "d_model": H, "ffn_dim": 128, "d_ff": 128, "d_inner": 128,
    "n_layers": 2, "n_heads": 4, "dim": H, "hidden_dim": 128, "emb_dim": H,
    "decoder_layers": 2, "decoder_attention_heads": 4, "decoder_ffn_dim": 128,
    "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
    "num_decoder_layers": 2, "decoder_start_token_id": 2,
    "state_size": 8, "expand": 2, "conv_kernel": 4, "time_step_rank": 8, "ssm_state_size": 8,
    "mamba_d_state": 8, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_conv": 4,
    "mamba_expand": 2, "mamba_chunk_size": 16, "n_groups": 1, "chunk_size": 16,
    "mamba_num_heads": 8, "mamba_head_dim": 16,
}
# Every config attribute that changes hidden -> logits in transformers 5.24, at a non-trivial value.
TRANSFORM_VALUES = {
    "logit_scale": 0.7, "logits_scaling": 3.0, "final_logit_softcapping": 5.0, "lm_head_multiplier": 0.5,
    "logits_mup_width_multiplier": 2.0, "logits_soft_cap": 5.0, "output_logit_soft_cap": 5.0,
    "output_multiplier": 1.7, "softcap": 5.0, "dim_model_base": 16,  # minicpm3: logits_scaling = 64/16
}
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type", "block_types", "layer_block_types",
                   "layers_types", "activation_sparsity_pattern", "no_rope_layers", "moe_layer_freq",
                   "mlp_only_layers")
LAYER_INDEX_LISTS = ("attn_layer_indices", "full_attn_idxs", "swa_layers", "hybrid_layer_ids", "attn_layer_offset",
                     "expert_layer_offset")
SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
               "cls_token_id", "mask_token_id", "unk_token_id")
# per model type: what its default config needs besides the sizes
EXTRA = {
    "reformer": {"attn_layers": ["local", "lsh"], "axial_pos_shape": [4, 4], "axial_pos_embds_dim": [32, 32],
                 "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4, "num_buckets": 2, "is_decoder": True,
                 "attention_head_size": 16, "hash_seed": 0},  # without a seed LSH draws new rotations per call
    "falcon_h1": {"mamba_d_ssm": 128},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "mamba2": {"num_heads": 8, "head_dim": 16},
    "zaya": {"num_experts_per_tok": 1},
    "cohere_compass_text": {"rope_parameters": {t: {"rope_type": "default", "rope_theta": 10000.0}
                                                for t in ("full_attention", "sliding_attention")}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "inkling_text": {"unpadded_vocab_size": 250},
    "zamba": {"num_hidden_layers": 4,
              "layers_block_type": ["hybrid", "linear_attention", "hybrid", "linear_attention"]},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 16,
                       "indexer_compress_ratio": 4, "ple_embed_dim": 32, "heads_per_ngram": 2},
    "dots3_note_text": {"num_key_value_heads": 4, "head_dim": 16},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}, "max_seq_len": 128},
}
SEQ = {"reformer": 16}  # a multiple of the LSH chunk length


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrunk_list(value):
    first = value[0]
    other = next((x for x in value if x != first), value[1])
    return [first, other] if not isinstance(value, str) else first + other


def tiny_kwargs(default, depth: int = 0) -> dict:
    """Overrides for a default config (and its sub-configs), only for keys it has."""
    from transformers import PretrainedConfig

    d = default.to_dict()
    kw = {k: v for k, v in TINY.items() if k in d and not isinstance(d[k], dict)}
    for k, v in TRANSFORM_VALUES.items():
        if (k in d or hasattr(type(default), k)) and not isinstance(getattr(type(default), k, None), property):
            kw[k] = v
    if "qk_rope_head_dim" in d and "head_dim" in d:  # MLA: the rotary part is qk_rope_head_dim wide
        kw["head_dim"] = TINY["qk_rope_head_dim"]
    if "kv_lora_rank" in d and "num_key_value_heads" in d:
        kw["num_key_value_heads"] = TINY["num_attention_heads"]
    if d.get("rotary_dim"):
        kw["rotary_dim"] = 8
    for k in ("embedding_size", "input_embedding_size", "output_embedding_size"):
        if isinstance(d.get(k), int):
            kw[k] = H
    vocab = kw.get("vocab_size", d.get("vocab_size"))
    for i, k in enumerate(SPECIAL_IDS):  # special token ids inside the tiny vocabulary
        v = d.get(k)
        if isinstance(vocab, int) and isinstance(v, int) and v >= vocab:
            kw[k] = i % 4
        elif isinstance(vocab, int) and isinstance(v, list) and any(isinstance(x, int) and x >= vocab for x in v):
            kw[k] = [i % 4]
    for k in PER_LAYER_LISTS:  # two layers: keep two entries, of distinct kinds where there are several
        v = d.get(k)
        if isinstance(v, (list, tuple, str)) and len(v) > 2 and not all(isinstance(x, int) and x > 1 for x in v):
            kw[k] = _shrunk_list(v)
    for k in LAYER_INDEX_LISTS:
        v = d.get(k)
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
            kw[k] = [x for x in v if x < 2] or [1]
    if isinstance(d.get("per_layer_config"), dict):
        kw["per_layer_config"] = {}
    for name in getattr(default, "sub_configs", {}) or {}:
        sub = getattr(default, name, None)
        if isinstance(sub, PretrainedConfig) and depth < 2:
            kw[name] = {**sub.to_dict(), **tiny_kwargs(sub, depth + 1)}
    return kw


def build(model_type: str):
    """``(model, input_ids)``: the tiny fp32 model in eval mode, with ids that its forward takes."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    default = AutoConfig.for_model(model_type)
    kw = tiny_kwargs(default)
    kw.update(EXTRA.get(model_type, {}))
    if "is_decoder" in default.to_dict():
        kw.setdefault("is_decoder", True)
    kw["tie_word_embeddings"] = getattr(default, "tie_word_embeddings", False)
    config = AutoConfig.for_model(model_type, **kw)
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    wanted = getattr(cls, "config_class", None)
    if wanted is not None and not isinstance(config, wanted):  # the causal LM of a composite config
        config = next((getattr(config, n) for n in getattr(config, "sub_configs", {}) or {}
                       if isinstance(getattr(config, n, None), wanted)), config)
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="eager").float().eval()
    if hasattr(model, "set_default_language"):  # X-MOD's per-language adapters
        model.set_default_language(next(iter(getattr(config, "languages", ["en_XX"]))))
    head = model.get_output_embeddings()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = head.weight.shape[0] if getattr(head, "weight", None) is not None else text.vocab_size
    rows = 2 * getattr(text, "num_codebooks", 1) if model_type.startswith("musicgen") else 2
    ids = torch.randint(5, min(vocab, 250) - 1, (rows, SEQ.get(model_type, 7)),
                        generator=torch.Generator().manual_seed(0))
    _perturb(model)
    _scale_head(model, head, ids)
    return model, ids


def _perturb(model) -> None:
    """Biases and norm gains away from 0 and 1: a transform that only shows with them is not missed."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.is_floating_point():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def _scale_head(model, head, ids) -> None:
    """LM-head weight rescaled so that the logits have a std of ~4 (forms no logits: the head is stubbed)."""
    from upo.heads.capture import call_causal_lm, recorded_head, zero_width

    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return
    with torch.no_grad():
        try:
            with recorded_head(head, zero_width) as seen:
                call_causal_lm(model, ids)
        except Exception:  # noqa: BLE001  (a model that does not run on these ids fails later, in the test)
            return
        if seen:
            std = float(torch.nn.functional.linear(seen[0].float(), weight.float()).std())
            if std > 0 and math.isfinite(std):
                weight.mul_(4.0 / std)


def own_logprobs(model, ids) -> torch.Tensor:
    """``log_softmax(model(ids).logits[:, :-1])`` at ``ids[:, 1:]``: the model's own numbers."""
    from upo.heads.capture import call_causal_lm, output_logits

    with torch.no_grad():
        logits = output_logits(call_causal_lm(model, ids)).double()
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
