"""One CPU benchmark case in a fresh process (so its peak RSS is its own).

``python -m benchmarks.cpu_case SPEC.json RESULT.json``: SPEC names the shape, peer, loss
kind, the precomputed reference sums, the timing settings, the reference outputs to compare
with (a ``.pt`` file written by an earlier case, or null) and where to save this case's
outputs if it may serve as the reference. run_cpu.py writes SPEC and reads RESULT.
"""
from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _warm_runtime():
    """Touch the runtime once (BLAS, OpenMP threads, autograd) before the inputs' baseline."""
    import torch

    a = torch.randn(64, 32, requires_grad=True)
    b = torch.randn(128, 32, requires_grad=True)
    (a @ b.t()).float().log_softmax(-1)[:, 0].sum().backward()


def main(spec_path, result_path):
    import torch

    from benchmarks import harness, inputs as inputs_mod, peers

    with open(spec_path) as f:
        spec = json.load(f)
    shape = inputs_mod.Shape.from_dict(spec["shape"])
    # imports of the peer happen here, before the baseline
    ok, _ = peers.availability(spec["peer"], "cpu")
    _warm_runtime()
    inputs = inputs_mod.make_inputs(shape, "cpu", seed=spec.get("seed", 0), ref_logps=spec["ref_logps"])

    ref = None
    if spec.get("ref_file"):
        def ref():  # loaded after the measurements, so it is not in the baseline
            out = torch.load(spec["ref_file"], weights_only=False)
            return out

    want = bool(spec.get("save_outputs"))
    record, outputs = harness.run_case(inputs, spec["peer"], spec["loss_kind"], "cpu", spec["timing"],
                                       ref=ref, want_outputs=want)
    if want and outputs is not None and record["status"] == "ok":
        torch.save({k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in outputs.items()},
                   spec["save_outputs"])
        record["saved_outputs"] = spec["save_outputs"]
    record["available"] = ok
    with open(result_path, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
