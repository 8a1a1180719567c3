"""Prompt sharing: each preference pair run through the model as ONE sequence ``[prompt, chosen, rejected]``.

The unshared layout runs ``[prompt, chosen]`` and ``[prompt, rejected]``, so the prompt goes through every
layer twice. Here the rejected response's position ids continue from the prompt's end (as in
``[prompt, rejected]``) and a 4-D attention mask lets its tokens see the prompt and themselves but not the
chosen response, so every hidden state equals the unshared one. :meth:`SharedPromptRows.unshare` then
gathers the hidden states back into the unshared ``[2B, T, D]`` layout: labels, the value head's prompt
position, the first rejected token (predicted from the prompt's last hidden state, not the chosen
response's last) and everything downstream are those of the unshared rows, unchanged.

Under SDPA the attention runs block by block (:func:`block_attention`): ``[prompt, chosen]`` on SDPA's causal
kernels, the rejected response over the prompt and itself (:func:`upo_kernels.prefix_attention.prefix_causal_attention`:
on CPU two flash kernels merged by log-sum-exp, no mask; on CUDA a small mask). A dense ``[S, S]`` mask would cost
``S^2`` memory and make SDPA score every (query, key) pair, the causal half it could skip included: with a prompt of
3/4 of the sequence that is more attention work than the unshared rows. Eager attention takes the dense 4-D mask.
Other implementations are refused: flash-attention's varlen kernels
take only contiguous causal segments, which cannot say "the prompt, then skip the chosen response". Flex
attention would take the mask as a score bias, but it is refused until verified: on CPU (torch 2.13) it has
no backward and its forward crashed the process.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from upo_kernels.prefix_attention import prefix_causal_attention

MASKED_ATTENTION = ("sdpa", "eager")  # implementations verified to honour a custom 4-D mask


@dataclass
class SharedPromptRows:
    """``B`` pairs as ``B`` rows ``[prompt, chosen, rejected, padding]`` of width ``S``.

    ``source``: ``[2B, T]`` positions into the flattened ``[B * S]`` shared rows, one per position of the
    unshared rows (padding points at the pair's first token). ``spans``: per pair, its (prompt, chosen,
    rejected) lengths, from which :attr:`allowed` (the dense mask eager attention needs) is derived on demand:
    attention by block under SDPA never builds it.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    source: torch.Tensor
    num_tokens: int = 0
    spans: tuple = ()

    @property
    def allowed(self) -> torch.Tensor:
        """Bool ``[B, 1, S, S]``, True where query ``q`` may attend key ``k``: causal, the rejected response not
        seeing the chosen one, a padding position seeing only itself (so no row of the softmax is empty)."""
        width = self.input_ids.shape[1]
        positions = torch.arange(width, device=self.input_ids.device)
        query, key = positions[:, None], positions[None, :]
        allowed = torch.zeros((len(self.spans), 1, width, width), dtype=torch.bool, device=self.input_ids.device)
        for i, (prompt, chosen, rejected) in enumerate(self.spans):
            real, rejected_start = prompt + chosen + rejected, prompt + chosen
            rejected_query = (query >= rejected_start) & (query < real)
            chosen_key = (key >= prompt) & (key < rejected_start)
            real_query = query < real
            allowed[i, 0] = (((key <= query) & real_query & ~(rejected_query & chosen_key))
                             | (~real_query & (key == query)))
        return allowed

    def to(self, device) -> "SharedPromptRows":
        return SharedPromptRows(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor)
                                            else v) for f in fields(self)})

    def attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The additive mask (0 where allowed, the most negative ``dtype`` value elsewhere), ``[B, 1, S, S]``.

        Additive in the compute dtype rather than boolean, for SDPA too: given a boolean mask, SDPA's CPU
        kernel makes a float copy per call and keeps it for backward, one ``S x S`` copy per layer; this one
        tensor is shared by every layer (SDPA wants the query's dtype, eager adds it to the scores)."""
        allowed = self.allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)

    def unshare(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, S, D]`` shared hidden states -> ``[2B, T, D]`` in the unshared rows' layout (differentiable)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        return flat[self.source.reshape(-1)].reshape(*self.source.shape, hidden.shape[-1])


def check_masked_attention(*models) -> None:
    """Every model the shared rows go through (the policy, a reference model; None and non-modules skipped) uses
    an attention implementation that honours a 4-D mask; a ValueError naming the one found otherwise."""
    for model in models:
        if not isinstance(model, nn.Module):
            continue
        attn_implementation = attention_implementation_of(model)
        if attn_implementation not in MASKED_ATTENTION:
            raise ValueError(f"prompt sharing needs attention that takes a 4-D mask ({', '.join(MASKED_ATTENTION)});"
                             f" the model uses {attn_implementation!r} (flash-attention's varlen kernels cannot skip "
                             "the chosen response; flex attention is not verified yet): load it with "
                             "attn_implementation='sdpa'")
        window = sliding_window_of(model)
        if window is not None:
            raise ValueError(f"prompt sharing runs full causal attention over [prompt, chosen, rejected]; the model's "
                             f"attention has a sliding window of {window} tokens, which its rows would not keep")


def check_split_attention(*models) -> None:
    """Every model a sequence split over processes goes through (None and non-modules skipped) runs SDPA, which
    the split's attention stands in front of, without a sliding window; a ValueError naming what was found."""
    for model in models:
        if not isinstance(model, nn.Module):
            continue
        implementation = attention_implementation_of(model)
        if implementation != "sdpa":
            raise ValueError(f"context parallelism runs attention as SDPA over gathered keys and values; the model "
                             f"uses {implementation!r}: load it with attn_implementation='sdpa'")
        window = sliding_window_of(model)
        if window is not None:
            raise ValueError(f"context parallelism runs full causal attention; the model's attention has a "
                             f"sliding window of {window} tokens")


def sliding_window_of(model: nn.Module) -> int | None:
    """The sliding window a transformers model's attention uses (None: none): ``sliding_window`` in its config,
    unless ``use_sliding_window`` is False (Qwen2 keeps a window in configs that do not use it)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            window = getattr(config, "sliding_window", None)
            if window is None or getattr(config, "use_sliding_window", True) is False:
                return None
            return window
    return None


def share_prompt_rows(input_ids: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor,
                      pad_id: int) -> SharedPromptRows:
    """The shared rows of a right-padded unshared batch: ``input_ids`` ``[2B, T]`` (``B`` ``[prompt, chosen]``
    rows, then ``B`` ``[prompt, rejected]`` rows), ``lengths`` ``[2B]`` real tokens per row, ``prompt_lengths``
    ``[B]``. Raises ``ValueError`` when a pair's two rows do not start with the same prompt."""
    pairs = input_ids.shape[0] // 2
    lengths, prompt_lengths = lengths.tolist(), prompt_lengths.tolist()
    spans = []  # (prompt, chosen, rejected) lengths per pair
    for i in range(pairs):
        prompt = prompt_lengths[i]
        chosen, rejected = lengths[i] - prompt, lengths[pairs + i] - prompt
        if min(chosen, rejected) < 0 or not torch.equal(input_ids[i, :prompt], input_ids[pairs + i, :prompt]):
            raise ValueError(f"pair {i}: the chosen and rejected rows do not start with the same {prompt}-token "
                             "prompt, so it cannot be shared (e.g. truncated from the start)")
        spans.append((prompt, chosen, rejected))
    width = max(sum(span) for span in spans)
    device = input_ids.device
    shared_ids = torch.full((pairs, width), pad_id, dtype=input_ids.dtype, device=device)
    position_ids = torch.zeros((pairs, width), dtype=torch.long, device=device)
    source = torch.zeros(input_ids.shape, dtype=torch.long, device=device)
    positions = torch.arange(width, device=device)
    for i, (prompt, chosen, rejected) in enumerate(spans):
        real, rejected_start = prompt + chosen + rejected, prompt + chosen
        shared_ids[i, :rejected_start] = input_ids[i, :rejected_start]
        shared_ids[i, rejected_start:real] = input_ids[pairs + i, prompt:prompt + rejected]
        position_ids[i, :rejected_start] = positions[:rejected_start]
        position_ids[i, rejected_start:real] = positions[prompt:prompt + rejected]  # as in [prompt, rejected]
        row = i * width
        source[i, :rejected_start] = row + positions[:rejected_start]
        source[i, rejected_start:] = row  # padding of the unshared row
        source[pairs + i, :prompt] = row + positions[:prompt]
        source[pairs + i, prompt:prompt + rejected] = row + positions[rejected_start:real]
        source[pairs + i, prompt + rejected:] = row
    return SharedPromptRows(shared_ids, position_ids, source, num_tokens=sum(map(sum, spans)), spans=tuple(spans))


def prompt_lengths_of(completion_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` prompt lengths of right-padded ``[2B, T]`` rows: the first completion token of the chosen row;
    a row with no completion (truncated inside the prompt) is all prompt."""
    pairs = completion_mask.shape[0] // 2
    chosen = completion_mask[:pairs].to(torch.int64)
    return torch.where(chosen.any(dim=1), chosen.argmax(dim=1), attention_mask[:pairs].sum(dim=1))


def attention_implementation_of(model: nn.Module) -> str | None:
    """The attention implementation a transformers model (or a wrapper around one) was loaded with."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            return config._attn_implementation
    return None


def compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype attention computes in: autocast's when it is on, else the model's floating weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def shared_hidden_states(head, model: nn.Module, rows: SharedPromptRows) -> torch.Tensor:
    """The hidden states ``head`` (an :class:`upo.heads.LMHead`) consumes, computed on the shared rows and
    returned in the unshared ``[2B, T, D]`` layout.

    Under SDPA the attention runs per block (:func:`block_attention`, no ``[S, S]`` mask); under eager, with the
    additive 4-D mask."""
    check_masked_attention(model)
    if attention_implementation_of(model) == "sdpa":
        install_block_attention()
        # A mask of ones, not None: with no mask, transformers reads the restarting position ids as packed
        # sequences and builds an [S, S] mask that every layer keeps (block_attention reads the spans instead).
        hidden = head.hidden_states(model, rows.input_ids, torch.ones_like(rows.input_ids), rows.position_ids,
                                    upo_shared_spans=rows.spans)
    else:
        mask = rows.attention_mask(compute_dtype(model, rows.input_ids.device))
        hidden = head.hidden_states(model, rows.input_ids, mask, rows.position_ids)
    return rows.unshare(hidden)


def context_hidden_states(head, model: nn.Module, rows) -> torch.Tensor:
    """``[rows, L/N, D]``: the hidden states ``head`` consumes of this rank's chunks of a sequence split over
    processes (``rows``: an :class:`upo.context_parallel.ContextParallelRows`), its attention run by
    :func:`block_attention` (SDPA only: the split's attention is SDPA's kernels on gathered keys)."""
    check_split_attention(model)
    install_block_attention()
    return head.hidden_states(model, rows.input_ids, torch.ones_like(rows.input_ids), rows.position_ids,
                              upo_context_parallel=rows)


def block_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                    upo_shared_spans=None, upo_context_parallel=None, **kwargs):
    """SDPA over shared rows, block by block: ``[prompt, chosen]`` causally (SDPA's causal kernels, no mask), then
    the rejected response over the prompt and itself (:func:`prefix_causal_attention`: every prompt key, its own
    keys causally). The unshared rows' attention without the ``[S, S]`` mask, and without its work: a dense mask
    makes SDPA score every (query, key) pair of the row, causal or not. Padding positions get zeros (no row reads
    them). Anything without ``upo_shared_spans`` goes to transformers' own SDPA unchanged.

    ``query`` ``[B, H, S, hd]``, ``key``/``value`` ``[B, KVH, S, hd]``; returns ``([B, S, H, hd], None)`` as
    transformers' attention functions do. Given ``upo_context_parallel`` (``upo.context_parallel``'s rows of this
    rank), the attention over a sequence split across processes runs instead, under the same refusals."""
    if upo_shared_spans is None and upo_context_parallel is None:
        return _TRANSFORMERS_SDPA[0](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)
    for name in ("sliding_window", "softcap", "position_bias", "s_aux"):  # what only a mask or eager would apply
        if kwargs.get(name) is not None:
            raise ValueError(f"prompt sharing: this model's attention takes {name}={kwargs[name]!r}, which attention "
                             "by block does not apply")
    if getattr(module, "is_causal", True) is False:
        raise ValueError("prompt sharing: this attention layer is not causal")
    if upo_context_parallel is not None:
        return upo_context_parallel.attention(query, key, value, scaling=scaling, dropout=dropout), None
    groups = query.shape[1] // key.shape[1]
    rows = []
    for i, (prompt, chosen, rejected) in enumerate(upo_shared_spans):
        q, k, v = query[i:i + 1], key[i:i + 1], value[i:i + 1]
        first = prompt + chosen
        parts = [F.scaled_dot_product_attention(q[:, :, :first], k[:, :, :first], v[:, :, :first], dropout_p=dropout,
                                                is_causal=True, scale=scaling, enable_gqa=groups > 1)]
        if rejected:
            parts.append(prefix_causal_attention(q[:, :, first:first + rejected], k[:, :, :prompt], v[:, :, :prompt],
                                                 k[:, :, first:first + rejected], v[:, :, first:first + rejected],
                                                 scale=scaling, dropout_p=dropout))
        padding = query.shape[2] - first - rejected
        if padding:
            parts.append(q.new_zeros(1, q.shape[1], padding, v.shape[-1]))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


_TRANSFORMERS_SDPA = []  # transformers' own "sdpa" function, once block_attention stands in front of it


def install_block_attention() -> None:
    """Put :func:`block_attention` in front of transformers' ``"sdpa"`` attention (once per process): a forward
    given ``upo_shared_spans`` runs per block, every other call reaches transformers' SDPA unchanged. Passed as a
    forward keyword, the spans reach the recompute of gradient checkpointing too."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS["sdpa"] is not block_attention:
        _TRANSFORMERS_SDPA[:] = [ALL_ATTENTION_FUNCTIONS["sdpa"]]
        ALL_ATTENTION_FUNCTIONS["sdpa"] = block_attention
