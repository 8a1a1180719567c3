"""PEFT wrappers of the LM head: what ``get_output_embeddings()`` is once ``peft`` touched it.

* LoRA (``target_modules`` naming the head): ``peft.tuners.lora.Linear``, whose ``.weight`` is the
  *base* weight. Its forward is ``base(x) + s * B(A(dropout(x)))`` summed over the active adapters,
  so with dropout 0 the head is exactly ``W + s * B @ A`` (and ``b + s * b_B`` with ``lora_bias``),
  rebuilt every step inside autograd so that gradients reach A and B. Disabled or merged adapters
  read the base weight. Dropout > 0 on the head, DoRA and other LoRA variants are refused: no fixed
  weight reproduces them.
* ``modules_to_save=["lm_head"]``: the active adapter's copy (the original when adapters are off).
* ``trainable_token_indices``: ``.weight`` of the wrapper is already the merged weight.
* any other PEFT method on the head: refused.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from upo.heads.errors import UnsupportedModelError
from upo.heads.weights import HeadWeights


class LoraWeights(HeadWeights):
    def __init__(self, layer: nn.Module, base: HeadWeights):
        self.layer, self.base = layer, base
        self.kind = f"LoRA on [{base.kind}]: W + scaling * B @ A"

    def read(self):
        weight, bias = self.base.read()
        layer = self.layer
        if layer.disable_adapters or layer.merged:
            return weight, bias
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                continue
            a, b, scaling = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
            weight = weight + (scaling * (b.weight @ a.weight)).to(weight.dtype)
            if getattr(b, "bias", None) is not None:
                extra = (scaling * b.bias).to(weight.dtype)
                bias = extra if bias is None else bias + extra
        return weight, bias


class ModulesToSaveWeights(HeadWeights):
    def __init__(self, wrapper: nn.Module, original: HeadWeights, copies: dict[str, HeadWeights]):
        self.wrapper, self.original, self.copies = wrapper, original, copies
        self.kind = f"modules_to_save copy of [{original.kind}]"

    def read(self):
        wrapper = self.wrapper
        active = wrapper.active_adapters
        if wrapper.disable_adapters or not active or active[0] not in self.copies:
            return self.original.read()
        return self.copies[active[0]].read()


class TrainableTokensWeights(HeadWeights):
    kind = "trainable tokens (peft): the merged weight"

    def __init__(self, wrapper: nn.Module):
        self.wrapper = wrapper

    def read(self):  # .weight: the base weight with the trained rows in place (base weight when disabled)
        return self.wrapper.weight, getattr(self.wrapper.original_module, "bias", None)


def _check_lora_head(layer: nn.Module, name: str) -> None:
    for adapter in layer.lora_A:
        if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
            dora = getattr(layer, "use_dora", {}).get(adapter, False)
            variant = "DoRA" if dora else type(layer.lora_variant[adapter]).__name__
            raise UnsupportedModelError(
                f"{name}: the LM head carries a LoRA variant ({variant}, adapter '{adapter}') that upo cannot "
                "express as one head weight; leave the LM head out of target_modules or use plain LoRA")
        dropout = layer.lora_dropout[adapter]
        if not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 1.0) > 0:
            raise UnsupportedModelError(
                f"{name}: LoRA on the LM head with lora_dropout={dropout.p} (adapter '{adapter}'): no single "
                "head weight reproduces dropout on the head's input; use lora_dropout=0 or leave the LM head "
                "out of target_modules")


def peft_head_weights(head: nn.Module, name: str, resolve: Callable[[nn.Module, str], HeadWeights]) -> HeadWeights:
    """The weights of a PEFT-wrapped head (``resolve`` reads the module it wraps)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper, TrainableTokensWrapper

    if isinstance(head, LoraLayer):
        base = head.get_base_layer() if hasattr(head, "get_base_layer") else head.base_layer
        if not isinstance(base, nn.Linear) or type(head).__name__ != "Linear":
            raise UnsupportedModelError(f"{name}: LoRA on an LM head of type {type(base).__name__} "
                                        f"({type(head).__name__}) is not supported; use an nn.Linear head")
        _check_lora_head(head, name)
        return LoraWeights(head, resolve(head.base_layer, name))
    if isinstance(head, ModulesToSaveWrapper):
        copies = {adapter: resolve(module, name) for adapter, module in head.modules_to_save.items()}
        return ModulesToSaveWeights(head, resolve(head.original_module, name), copies)
    if isinstance(head, TrainableTokensWrapper):
        return TrainableTokensWeights(head)
    raise UnsupportedModelError(f"{name}: the LM head is wrapped by a PEFT method upo does not read "
                                f"({type(head).__module__}.{type(head).__name__}); leave the LM head out of it")


def adapter_key(head: nn.Module) -> tuple:
    """What of a PEFT head's structure a description depends on (adapters added or removed)."""
    for attribute in ("lora_A", "modules_to_save"):
        adapters = getattr(head, attribute, None)
        if isinstance(adapters, (nn.ModuleDict, dict)):
            return (attribute, tuple(sorted(adapters.keys())))
    return ()
