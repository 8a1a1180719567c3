"""Benchmark shapes and the deterministic inputs every implementation receives.

A shape is ``B`` preference pairs of ``T`` response tokens each, so ``N = 2 B T`` tokens
(chosen rows first, then rejected rows, as TRL concatenates them), hidden size ``D`` and
vocabulary ``V``. Every token is a response token (prompt tokens carry no loss and would
be dropped before the LM head by any of the implementations compared).

Inputs are built in place (no temporaries the size of the weight), so that the memory held
before a measured call is just hidden, weight, labels and the small per-sequence vectors.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Logit spread of the random LM head: logits have std ~ LOGIT_STD (a peaked softmax, closer to
# a trained model than std 1; the same choice as benchmarks/probe_kernels.py).
LOGIT_STD = 3.0


@dataclass(frozen=True)
class Shape:
    B: int  # preference pairs
    T: int  # response tokens per sequence
    D: int  # hidden size
    V: int  # vocabulary
    dtype: str = "bfloat16"
    sweeps: tuple = field(default=(), compare=False)

    @property
    def N(self) -> int:
        return 2 * self.B * self.T

    @property
    def key(self) -> str:
        return f"B{self.B}-T{self.T}-D{self.D}-V{self.V}-{self.dtype}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(N=self.N, key=self.key, sweeps=list(self.sweeps))
        return d

    @staticmethod
    def from_dict(d: dict) -> "Shape":
        return Shape(int(d["B"]), int(d["T"]), int(d["D"]), int(d["V"]), d.get("dtype", "bfloat16"),
                     tuple(d.get("sweeps", ())))


def merge_shapes(shapes):
    """Deduplicate shapes that several sweeps share, keeping the union of their sweep tags."""
    out: dict = {}
    for s in shapes:
        base = Shape(s.B, s.T, s.D, s.V, s.dtype)
        if base in out:
            tags = tuple(dict.fromkeys(out[base].sweeps + s.sweeps))
            out[base] = Shape(s.B, s.T, s.D, s.V, s.dtype, tags)
        else:
            out[base] = s
    return list(out.values())


def _generator(device, seed):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def make_inputs(shape: Shape, device, seed: int = 0, ref_logps=None, logit_std: float = LOGIT_STD):
    """Deterministic inputs for one shape on ``device``.

    Returns a dict with ``hidden`` [2B, T, D] and ``weight`` [V, D] (leaves requiring grad),
    ``labels`` [2B, T] int64, ``ref_hidden`` [2B, T, D] (the reference model's states: the
    policy's plus noise; only Liger reads them, it cannot take precomputed reference log-probs),
    ``ref_logps`` [2B] fp32 (reference sums, precomputed here unless given), ``lengths`` [2B],
    ``aux_rewards`` [2B] (designer rewards for UPO) and ``beta``.
    """
    device = torch.device(device)
    dtype = DTYPES[shape.dtype]
    g = _generator(device, seed)
    rows = 2 * shape.B
    hidden = torch.randn(rows, shape.T, shape.D, device=device, dtype=dtype, generator=g)
    weight = torch.randn(shape.V, shape.D, device=device, dtype=dtype, generator=g)
    weight.mul_(logit_std / math.sqrt(shape.D))
    labels = torch.randint(0, shape.V, (rows, shape.T), device=device, generator=g)
    ref_hidden = torch.randn(rows, shape.T, shape.D, device=device, dtype=dtype, generator=g)
    ref_hidden.mul_(0.1).add_(hidden)
    aux = torch.rand(rows, device=device, generator=g, dtype=torch.float32)
    if ref_logps is None:
        ref_logps = sequence_logps_nograd(ref_hidden, weight, labels)
    else:
        ref_logps = torch.as_tensor(ref_logps, dtype=torch.float32).to(device)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    return {
        "shape": shape,
        "hidden": hidden,
        "weight": weight,
        "labels": labels,
        "ref_hidden": ref_hidden,
        "ref_logps": ref_logps,
        "lengths": torch.full((rows,), shape.T, device=device, dtype=torch.float32),
        "aux_rewards": aux,
        "beta": 0.1,
    }


@torch.no_grad()
def sequence_logps_nograd(hidden, weight, labels, rows_per_chunk_tokens: int = 2048):
    """Per-sequence log-prob sums (fp32) the naive way, a chunk of tokens at a time.

    Used once per shape for the precomputed reference log-probs; never timed.
    """
    rows, T, D = hidden.shape
    h = hidden.reshape(-1, D)
    y = labels.reshape(-1)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    step = max(1, min(rows_per_chunk_tokens, (1 << 28) // max(1, weight.shape[0])))
    for t0 in range(0, h.shape[0], step):
        z = (h[t0:t0 + step] @ weight.t()).float()
        out[t0:t0 + step] = z.gather(1, y[t0:t0 + step, None]).squeeze(1) - torch.logsumexp(z, dim=1)
        del z
    return out.view(rows, T).sum(1)


def input_bytes(inputs) -> int:
    """Bytes held by the inputs (for the record; the measured baseline already includes them)."""
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))
