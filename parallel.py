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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_and_dtype(name="auto"):
    """This worker's GPU if there is one, else the CPU; and the model's dtype (--dtype): "auto" is
    bf16 on a GPU that supports it, else fp32."""
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if name == "float16":
        print("note: float16 trains without loss scaling here: gradients below about 6e-8 become 0 "
              "and large ones inf (the run then stops); prefer --dtype bfloat16")  # fmt: skip
    if name != "auto":
        return device, DTYPES[name]
    return device, torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32


class Adam(torch.optim.Adam):
    """torch's Adam, plus an fp32 master copy of every trainable weight stored in a lower precision.
    bf16 keeps 8 significant bits: an update below about 0.4% of a weight (most updates at lr 1e-5)
    would round away. The model still computes in its own dtype: each step moves the fp32 copy and
    writes it back rounded, so small updates add up. fp32 weights are stepped as they are.
    Gradients are still accumulated, averaged over workers and clipped in the model's dtype (as
    DistributedDataParallel averages them); only the step and the weights it moves are in fp32.
    `params`: a flat list of tensors (no parameter groups)."""

    def __init__(self, params, **kwargs):
        self.weights = list(params)
        low = [p.dtype != torch.float32 for p in self.weights]
        self.masters = [p.detach().float() if lo else p for p, lo in zip(self.weights, low)]
        super().__init__(self.masters, **kwargs)

    def __getstate__(self):  # copy.deepcopy (the notebook's trial update) keeps the links too
        return {**super().__getstate__(), "weights": self.weights, "masters": self.masters}

    def copies(self):  # (weight, its fp32 master) for each weight in a lower precision
        return [(w, m) for w, m in zip(self.weights, self.masters) if m is not w]

    def zero_grad(self, set_to_none=True):
        for w in self.weights:
            w.grad = None
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "parallel.Adam takes no closure"
        for w, m in self.copies():  # the (averaged, clipped) gradient, in fp32; the low one freed
            m.grad, w.grad = (None if w.grad is None else w.grad.float()), None
        super().step()
        for w, m in self.copies():
            w.copy_(m)  # rounded to the model's dtype
            m.grad = None  # nothing held through the next rollout

    def state_dict(self):  # --resume: the masters too, or bf16 runs would not resume exactly
        masters = [m.detach().to("cpu", copy=True) for _, m in self.copies()]
        return {**super().state_dict(), "masters": masters}

    def load_state_dict(self, state_dict):
        """Adam's state, and the masters as saved; a checkpoint without them (written in another
        dtype) starts them from the weights, which --resume has restored by now."""
        state_dict = dict(state_dict)
        masters, pairs = state_dict.pop("masters", None), self.copies()
        super().load_state_dict(state_dict)
        if masters is None or len(masters) != len(pairs):
            masters = [w for w, _ in pairs]
        with torch.no_grad():
            for (w, m), saved in zip(pairs, masters):
                m.copy_(saved)
                w.copy_(m)


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
    """A hash of the trainable weights' bytes, in any dtype (numpy has no bf16: read raw bytes)."""
    tensors = trainable_state(policy).values()
    raw = (t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors)
    return hashlib.sha1(b"".join(raw)).hexdigest()


def check_weights_agree(policy, row):
    """torchrun: the point of averaging gradients, checked after every update."""
    if WORLD > 1:
        row["weight_digests"] = gather(weights_digest(policy))
        if len(set(row["weight_digests"])) != 1:
            raise RuntimeError(f"the workers' weights differ after update {row['update']}")
