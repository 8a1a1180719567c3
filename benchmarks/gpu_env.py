"""What the GPU commands run on: device, versions, and whether each peer imports (and how long
that takes). Prints one line per item and writes ``env.json`` to ``--out`` ($OUT, ./bench-results).

    python benchmarks/gpu_env.py [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# module to import -> what needs it
MODULES = {
    "torch": "everything", "triton": "upo_kernels", "transformers": "upo-train", "upo": "this project",
    "upo_kernels.triton_ops": "ours_triton*", "trl.kernels.chunked_logprob": "trl_chunked",
    "trl.trainer.utils": "trl_selective (and trl_chunked's chunk size)",
    "liger_kernel.chunked_loss": "liger", "cut_cross_entropy": "cce", "datasets": "trl.trainer.utils",
    "xdist": "pytest -n (GPU tests in parallel)",
}


def _version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    doc = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
           "pythonpath": os.environ.get("PYTHONPATH", ""), "imports": {}}
    print(f"python {doc['python']} ({sys.executable})", flush=True)
    for mod, why in MODULES.items():
        t0 = time.time()
        try:
            m = importlib.import_module(mod)
            top = mod.split(".")[0]
            ver = getattr(sys.modules.get(top), "__version__", None) or _version(top.replace("_", "-"))
            row = {"ok": True, "version": ver, "file": getattr(m, "__file__", None), "seconds": round(time.time() - t0, 2)}
        except Exception as exc:  # noqa: BLE001 - a missing peer is a finding, not a failure
            row = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}", "seconds": round(time.time() - t0, 2)}
        row["needed_by"] = why
        doc["imports"][mod] = row
        print(f"  {mod:<30} " + (f"{row['version'] or ''} ({row['seconds']} s) {row['file'] or ''}" if row["ok"]
                                 else f"NOT IMPORTABLE: {row['error'][:150]}"), flush=True)
    import torch

    doc["cuda_available"] = torch.cuda.is_available()
    if doc["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        doc.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   sm_count=p.multi_processor_count, gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda)
        print(f"device {doc['device']} sm_{''.join(map(str, doc['capability']))}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}", flush=True)
    else:
        doc["device"] = "CPU"
        print("device: no CUDA (CPU)", flush=True)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        doc["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        doc["nvidia_smi"] = f"not available ({type(exc).__name__})"
    print(f"nvidia-smi: {doc['nvidia_smi']}", flush=True)
    try:
        doc["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           timeout=5, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except Exception:  # noqa: BLE001
        doc["git_commit"] = None
    common.write_json(doc, os.path.join(common.out_dir(args.out), "env.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
