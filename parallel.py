"""parallel.py: data parallelism with torchrun, for rl4vlm_min.py (a first reading skips it).

`torchrun --nproc_per_node K rl4vlm_min.py ...` starts K workers. Each steps its own envs with its
own seeds and samples its own answers; after every backward pass the workers average their
gradients, so all of them take the same optimizer step and hold the same weights, which is checked
after every update. Without torchrun there is one worker, and every function here does nothing.
"""

import datetime
import hashlib
import os

import torch
import torch.distributed as dist

# torchrun starts WORLD workers and tells each its RANK (without torchrun: 1 worker, rank 0)
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def device_and_dtype():
    """This worker's GPU in bf16 (where supported) if there is one, else the CPU in fp32."""
    if not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32


def start_workers(device):
    if WORLD > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # rank 0 evaluates alone while the others wait: allow a long wait
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=3))
    if device.type == "cuda":
        torch.cuda.set_device(device)


def stop_workers():
    if dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params):
    """After each worker's backward: every worker holds the mean of all workers' gradients, so all
    take the same optimizer step and the weights stay identical (as DistributedDataParallel)."""
    if WORLD == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)  # sum over workers
        p.grad /= WORLD


def broadcast_weights(module):
    """New layers were initialised on each worker: all start from rank 0's values."""
    if WORLD > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def gather(obj):
    """[obj of worker 0, obj of worker 1, ...] on every worker ([obj] without torchrun)."""
    if WORLD == 1:
        return [obj]
    out = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


def trainable_state(policy):
    """What RL changes: the trainable weights, and the critic input's fixed statistics."""
    state = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    state |= {f"value_head.{n}": b for n, b in policy.value_head.named_buffers()}
    return {n: t.detach().contiguous().cpu() for n, t in state.items()}


def weights_digest(policy):
    tensors = trainable_state(policy).values()
    return hashlib.sha1(b"".join(t.numpy().tobytes() for t in tensors)).hexdigest()


def check_weights_agree(policy, row):
    """torchrun: the point of averaging gradients, checked after every update."""
    if WORLD > 1:
        row["weight_digests"] = gather(weights_digest(policy))
        if len(set(row["weight_digests"])) != 1:
            raise RuntimeError(f"the workers' weights differ after update {row['update']}")
