"""How the processes of a ``torchrun`` launch divide a run: data parallelism (DDP, or FSDP2 with ``--fsdp``), model
copies sharded over ``--tp`` processes (``tensor_parallel.py``) or sequences split over ``--cp`` processes
(``context_parallel.py``). The trainer calls these three at set-up, after building its module, and after each
step's backward."""
from __future__ import annotations

from torch import nn

from upo.train.context_parallel import (SequenceSplit, check_cp, setup_cp_mesh, sum_gradients_over_cp,
                                        undo_fsdp_mean_over_cp)
from upo.train.runtime import Runtime, wrap_for_processes
from upo.train.tensor_parallel import average_gradients, check_tp, parallelize_run, setup_mesh


def setup_process_layout(config, runtime: Runtime) -> SequenceSplit | None:
    """The ``("dp", "tp")`` or ``("dp", "cp")`` mesh the flags ask for (the data follows the ``dp`` coordinate);
    with ``--cp``, this rank's part of every sequence."""
    check_tp(config, runtime.world_size, runtime.is_main)
    setup_mesh(runtime, config.tp)
    check_cp(config, runtime.world_size, runtime.is_main)
    return setup_cp_mesh(runtime, config.cp)


def wrap_module(trainer) -> nn.Module:
    """The trainer's module sharded (``--tp``) and wrapped (DDP/FSDP2), its gradients reduced as the layout needs."""
    if trainer.runtime.tp > 1:
        parallelize_run(trainer)
    model = wrap_for_processes(trainer.module, trainer.runtime, trainer.config.fsdp, trainer.log)
    sum_gradients_over_cp(model, trainer.runtime)
    return model


def finish_gradient_reduction(params: list, runtime: Runtime, fsdp: bool) -> None:
    """What the wrapper's own reduction leaves: the mean over ``dp`` under ``--tp`` (no DDP there), the sum over
    ``cp`` under FSDP2."""
    average_gradients(params, runtime)
    undo_fsdp_mean_over_cp(params, runtime, fsdp)
