"""Worker of ``test_train_tp.py``'s dp x tp test, in a module of its own: spawned processes import it, and it
imports neither transformers nor the trainer (a few seconds less per process)."""
import os

import torch


def dp_tp_worker(rank: int, world: int, port: int, out: str) -> None:
    """On a 2 x 2 ("dp", "tp") mesh: average gradients over dp, clip the whole gradient, map the sampler."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor

    from upo.train.data import PairSampler
    from upo.train.runtime import Runtime
    from upo.train.tensor_parallel import average_gradients, clip_grad_norm, setup_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        runtime = Runtime(torch.device("cpu"), rank, world)
        setup_mesh(runtime, 2)
        dp, mesh = runtime.dp_rank, runtime.mesh["tp"]
        # Each dp copy's gradients: an uneven (7-row) Shard(0) head weight and a replicated vector.
        head = torch.nn.Parameter(distribute_tensor(torch.zeros(7, 2), mesh, [Shard(0)]))
        norm = torch.nn.Parameter(torch.zeros(2))
        head.grad = distribute_tensor(torch.arange(14.0).view(7, 2) * (dp + 1), mesh, [Shard(0)])
        norm.grad = torch.tensor([3.0, 4.0]) * (dp + 1)
        average_gradients([head, norm], runtime)
        total = clip_grad_norm([head, norm], 1.0, runtime)
        sampler = PairSampler(list(range(16)), 4, 0, runtime.dp_rank, runtime.dp_size)
        torch.save(dict(dp=dp, tp=mesh.get_local_rank(), total=total, head=head.grad.full_tensor(),
                        norm=norm.grad.clone(), sampler=(sampler.rank, sampler.world_size)), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()
