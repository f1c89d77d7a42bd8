"""checkpoints.py: what rl4vlm_min.py writes to disk and reads back (a first reading skips it).

- the run's --output-dir and metrics.jsonl;
- exact resume: checkpoints written to a temp dir and then renamed (a crash never leaves half a
  checkpoint), holding the trainable weights, the optimizer, every worker's random generators and
  envs, and the episodes so far; --resume puts all of it back and reads the run's own settings;
- the SFT model that RL keeps (the KL reference, or LoRA's frozen base) and the first evaluation;
- the final model: LoRA merged, saved as a plain checkpoint that --model loads, plus the value head.
"""

import copy
import dataclasses
import json
import os
import random
import shutil
import tempfile

import torch

from checks import fail
from parallel import RANK, WORLD, gather, trainable_state

RESUME_FIXED = (
    "task", "model", "num_envs", "num_steps", "lora_rank", "lora_targets", "cot", "thoughts"
)  # fmt: skip


def resumed_args(args, given):
    """--resume DIR: the run's own settings from its checkpoint. Flags typed now override them
    (e.g. a lower --learning-rate after a NaN), except those the saved state depends on."""
    meta_path = os.path.join(args.resume, "checkpoint", "meta.json")
    if not os.path.isfile(meta_path):
        fail(
            f"--resume {args.resume!r} holds no checkpoint ({meta_path} is missing); pass the "
            "--output-dir of a run that saved one (with --save-every K, or a finished run)"
        )
    with open(meta_path) as f:
        saved = json.load(f)["args"]
    names = {field.name for field in dataclasses.fields(args)}
    gone, new = set(saved) - names, names - set(saved)  # a default now could change the run
    if gone or new:
        fail(f"--resume {args.resume!r} was written by an older rl4vlm_min.py (settings gone: "
             f"{sorted(gone)}, new: {sorted(new)}); start a new run")  # fmt: skip
    for key in RESUME_FIXED:
        if key in given and getattr(args, key) != saved[key]:
            fail(
                f"--resume {args.resume!r} holds a checkpoint made with --{key.replace('_', '-')} "
                f"{saved[key]!r}, not {getattr(args, key)!r}; resume with the same value or start "
                "a new run in another --output-dir"
            )
    typed = {key: getattr(args, key) for key in given if key in saved and key != "output_dir"}
    return type(args)(**{**saved, **typed, "output_dir": args.resume, "resume": args.resume})


def make_output_dir(args):
    """Rank 0 creates --output-dir and starts metrics.jsonl (appends to it on --resume)."""
    if RANK > 0:
        return
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a" if args.resume else "w"):
            pass
    except OSError as e:
        fail(f"cannot write --output-dir {args.output_dir!r} ({e.strerror}); choose a writable one")


def resumed_model(args):
    """A resumed run's SFT model (the frozen LoRA base or the KL reference), if it saved one."""
    path = os.path.join(args.output_dir, "sft_model")
    return path if args.resume and os.path.isdir(path) else None


def keep_sft_model(policy, args):
    """After SFT: RL freezes these weights (LoRA after SFT) or keeps them as the KL reference;
    --resume needs them."""
    if (args.lora_rank > 0 or args.kl_coef > 0) and not args.lora_in_sft and RANK == 0:
        policy.vlm.save_pretrained(os.path.join(args.output_dir, "sft_model"))
        policy.processor.save_pretrained(os.path.join(args.output_dir, "sft_model"))


def saved_before(args):
    with open(os.path.join(args.output_dir, "before_rl.json")) as f:
        return json.load(f)


def save_before(args, before):
    if RANK == 0:
        with open(os.path.join(args.output_dir, "before_rl.json"), "w") as f:
            json.dump(before, f)


def env_state(env):
    """The game and its random generator as plain data: set_env_state continues it exactly."""
    game = copy.deepcopy({key: getattr(env, key) for key in env.state_fields})
    return {"game": game, "rng": env.np_random.bit_generator.state}


def set_env_state(env, state):
    for key, value in copy.deepcopy(state["game"]).items():
        setattr(env, key, value)
    env.np_random.bit_generator.state = state["rng"]


def save_checkpoint(policy, optimizer, vec, args, rng, generator, episodes, update):
    """Every worker's RNGs and envs, gathered; rank 0 writes them with the weights and optimizer."""
    mine = {
        "torch_rng": torch.get_rng_state(), "generator": generator.get_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_rng": rng.bit_generator.state, "python_rng": random.getstate(),
        "envs": [env_state(env) for env in vec["envs"]], "ep_return": vec["ep_return"],
        "ep_len": vec["ep_len"], "episodes": episodes,
    }  # fmt: skip
    workers = gather(mine)
    if RANK == 0:
        state = {"optimizer": optimizer.state_dict(), "workers": workers}
        meta = dict(update=update, workers=WORLD, args=dataclasses.asdict(args))
        write_checkpoint(policy, state, meta, args.output_dir)


def write_checkpoint(policy, state, meta, output_dir):
    """Write everything to a fresh temp dir, then swap it in with renames: a crash at any point
    leaves the previous checkpoint whole (checkpoint/, or between the renames checkpoint.old/)."""
    from safetensors.torch import save_file

    final = os.path.join(output_dir, "checkpoint")
    tmp = tempfile.mkdtemp(prefix=".checkpoint-", dir=output_dir)
    try:
        save_file(trainable_state(policy), os.path.join(tmp, "policy.safetensors"))
        if policy.reference is not None:  # the KL reference's adapters, if any
            adapters = {
                n: p.contiguous().cpu()
                for n, p in policy.reference.named_parameters()
                if ".lora_" in n
            }
            save_file(adapters, os.path.join(tmp, "reference.safetensors"))
        torch.save(state, os.path.join(tmp, "state.pt"))  # plain data: loaded with weights_only
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    except BaseException:
        shutil.rmtree(tmp)  # a half-written temp dir is removed; the old checkpoint is untouched
        raise
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    if os.path.exists(final + ".old"):
        shutil.rmtree(final + ".old")


def restore_checkpoint(policy, optimizer, vec, args, rng, generator):
    """--resume: put back what save_checkpoint wrote. Returns (next update, episodes, metrics)."""
    from safetensors.torch import load_file

    ckpt = os.path.join(args.output_dir, "checkpoint")
    weights = load_file(os.path.join(ckpt, "policy.safetensors"))
    if set(weights) != set(trainable_state(policy)):
        fail(f"the checkpoint in {ckpt} does not match this model's trainable parameters; "
             "start a new run")  # fmt: skip
    policy.load_state_dict(weights, strict=False)
    if policy.reference is not None:
        reference = load_file(os.path.join(ckpt, "reference.safetensors"))
        policy.reference.load_state_dict(reference, strict=False)
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)  # never unpickles code
    if len(state["workers"]) != WORLD:
        n = len(state["workers"])
        fail(f"the checkpoint in {ckpt} was written by {n} worker(s), this run has {WORLD}; "
             f"resume with torchrun --nproc_per_node {n} (or without torchrun if 1)")  # fmt: skip
    optimizer.load_state_dict(state["optimizer"])
    state = state["workers"][RANK]
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    generator.set_state(state["generator"])
    rng.bit_generator.state = state["numpy_rng"]
    random.setstate(state["python_rng"])
    for env, saved in zip(vec["envs"], state["envs"]):
        set_env_state(env, saved)
    vec["obs"], vec["infos"] = (list(x) for x in zip(*(env.obs() for env in vec["envs"])))
    vec["ep_return"], vec["ep_len"] = list(state["ep_return"]), list(state["ep_len"])
    with open(os.path.join(ckpt, "meta.json")) as f:
        done = json.load(f)["update"]
    history, metrics = [], os.path.join(args.output_dir, "metrics.jsonl")
    if RANK == 0:  # rank 0 alone keeps the metrics; rows after the checkpoint are redone
        with open(metrics) as f:
            history = [json.loads(line) for line in f][:done]
        with open(metrics, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in history)
    print(f"resumed {args.output_dir} after update {done}/{args.num_updates}", flush=True)
    return done + 1, list(state["episodes"]), history


# ---- THE FINAL MODEL: a plain checkpoint that --model loads, and the value head ----
def merge_lora(vlm):
    """Each adapter folded into its base layer's weight: W + scale * B A, in fp32. A model with
    adapters over lower-precision weights becomes fp32 first: added into bf16 weights, a change
    below about 0.4% of a weight would round away, and the saved model would lose what RL
    learned there. Reloaded in fp32 it computes the evaluated policy (its bf16 layers plus the
    adapters' fp32 path) without bf16's rounding; reloaded in bf16, rounded once more."""
    adapters = [(name, m) for name, m in vlm.named_modules() if hasattr(m, "lora_A")]
    if adapters:
        vlm.float()  # and every config says so (save_pretrained updates the top one only)
        for config in (vlm.config, *(getattr(vlm.config, k) for k in vlm.config.sub_configs)):
            config.dtype = torch.float32
    for name, module in adapters:
        base = module.base
        with torch.no_grad():
            base.weight += module.scale * module.lora_B @ module.lora_A
        parent_name, _, child = name.rpartition(".")
        setattr(vlm.get_submodule(parent_name), child, base)


def save_final_model(policy, path):
    """A plain checkpoint of the evaluated policy (--model path) + the value head: LoRA merged in
    fp32 and saved in fp32; without LoRA, the weights as trained, in the model's dtype."""
    from safetensors.torch import save_file

    merge_lora(policy.vlm)
    policy.vlm.save_pretrained(path)
    policy.processor.save_pretrained(path)
    head = {k: v.contiguous() for k, v in policy.value_head.state_dict().items()}
    save_file(head, os.path.join(path, "value_head.safetensors"))
