"""report.py: what rl4vlm_min.py prints and plots, and the estimates it makes before it trains.

A first reading skips it; the lecture calls each function through a one-line hook:
- the setup line (the VLM's and the value head's sizes apart), what trains, SFT's read-out check;
- one line per PPO update (all workers' metrics merged) and metrics.jsonl;
- the learning curve (with the SFT-only, random and oracle levels and the diagnostics), the
  result table and summary.json;
- the random and oracle policies' success on the eval seeds;
- one GPU: the memory estimate and --dry-run (one rollout step and one update, timed).
It never imports the lecture: what it needs of it comes as arguments.
"""

import dataclasses
import json
import math
import os
import time

import numpy as np
import torch

import envs
from checkpoints import save_final_model
from parallel import RANK, WORLD, gather


def print_setup(policy, args, device, dtype, shape):
    """The run in one line: the model (the VLM's and the value head's sizes apart), the device,
    the prompt's length (`shape`: prompt_shape) and the schedule."""
    n_vlm = sum(p.numel() for p in policy.vlm.parameters())
    n_head = sum(p.numel() for p in policy.value_head.parameters())
    prompt_tokens, image_tokens = shape
    print(
        f"task {args.task} | model {args.model} ({type(policy.vlm).__name__}, "
        f"VLM {n_vlm / 1e6:.2f}M params + value head {n_head / 1e6:.2f}M) | {device} {dtype} | "
        f"prompt {prompt_tokens} tokens "
        f"({image_tokens} image) | {args.num_updates} updates x {args.batch_size} steps x "
        f"{WORLD} worker(s)",
        flush=True,
    )


def print_trainable(policy, args, phase, params):
    """What set_trainable chose: how many parameters train, and where the LoRA adapters are."""
    where = {}
    for name, module in policy.vlm.named_modules():
        if hasattr(module, "lora_A"):
            part = ".".join(n for n in name.split(".")[:2] if n != "model")
            where[part] = where.get(part, 0) + 1
    count = f"{phase.upper()} trains {sum(p.numel() for p in params):,} parameters"
    if phase == "rl":
        count += " (value head included)"
    if where:
        adapters = ", ".join(f"{n} in {part}" for part, n in where.items())
        count += (
            f": LoRA rank {args.lora_rank} adapters on {sum(where.values())} linear layers "
            f"({adapters}), the rest of the VLM frozen"
        )
    print(count if where else count + ": every weight of the VLM", flush=True)


def readout_accuracy(policy, frames, prompts, expected, max_new_tokens):
    """SFT's check: the share of greedy answers (eval mode, as when the model plays) that hold the
    `expected` read-out of their state, on held-out frames and their prompts."""
    policy.eval()
    answers = policy.generate(frames, prompts, True, max_new_tokens)
    texts = [policy.processor.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    hits = [want in text for want, text in zip(expected, texts)]
    policy.train()
    return float(np.mean(hits))


def log_sft_step(policy, args, step, loss, check):
    """Every 50 SFT steps and at the last: the loss and the greedy read-out on the check set
    (frames, prompts, expected read-outs)."""
    if step % 50 == 0 or step == args.sft_steps:
        readout = readout_accuracy(policy, *check, args.max_new_tokens)
        print(f"sft step {step:4d}/{args.sft_steps} | loss {loss:.3f} | "
              f"read-out (greedy) {readout:.2f}", flush=True)  # fmt: skip


def finite_mean(values):
    """The mean of the workers' figures, leaving out a NaN: a worker whose returns hardly varied
    has no explained variance (NaN), and the others' figures still tell how the critic does."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def update_row(args, update, lr, episodes, data, stats, t_update):
    """One update's metrics over all workers: success and return of their last 100 episodes each,
    the mean of each worker's rates and losses."""
    recent = [episode for worker in gather(episodes[-100:]) for episode in worker]
    mine = dict(
        format_error_rate=data["format_error_rate"], readout_acc=data["readout_acc"], **stats
    )
    merged = {key: finite_mean([worker[key] for worker in gather(mine)]) for key in mine}
    nan = float("nan")
    return dict(
        update=update, env_steps=update * args.batch_size * WORLD, lr=lr,
        episodes=sum(gather(len(episodes))),
        success=float(np.mean([r > 0 for r, _ in recent])) if recent else nan,
        mean_return=float(np.mean([r for r, _ in recent])) if recent else nan,
        **merged, steps_per_second=args.batch_size * WORLD / (time.time() - t_update),
        samples=data["gallery"],
    )  # fmt: skip


def log_update(args, row, example):
    """metrics.jsonl gets the row; the console gets one line of it and one sampled answer."""
    if RANK == 0:
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    ev = row["explained_var"]  # NaN where the returns hardly varied: no variance to explain
    explained = "flat" if math.isnan(ev) else f"{ev:+.2f}"
    print(
        f"update {row['update']:3d}/{args.num_updates} | steps {row['env_steps']:6d} | "
        f"success {row['success']:.2f} | return {row['mean_return']:+.2f} | "
        f"fmt_err {row['format_error_rate']:.2f} | read {row['readout_acc']:.2f} | "
        f"pg {row['pg_loss']:+.3f} | v {row['v_loss']:.3f} | kl {row['approx_kl']:.4f} | "
        f"kl_ref {row['kl_ref']:.4f} | clip {row['clipfrac']:.2f} | "
        f"ev {explained} | {row['steps_per_second']:.0f} steps/s"
        + (f" | {WORLD} workers" if WORLD > 1 else ""),
        flush=True,
    )
    print(f"    e.g. {example['answer']!r} -> {example['action']}", flush=True)


def plot_curve(history, path, title, levels):
    """Success over env steps with the SFT-only, random and oracle levels (`levels`: name ->
    success), and beside it format errors, read-out, approx_kl, kl_ref and explained variance.
    A bare Figure, not pyplot: no backend is switched (a notebook keeps showing its figures)."""
    from matplotlib.figure import Figure

    steps = [h["env_steps"] for h in history]
    fig = Figure(figsize=(10, 3.4))
    ax, ax2 = fig.subplots(1, 2)
    success = [h["success"] for h in history]
    ax.plot(steps, success, marker="o", ms=3, label="success (last 100 episodes)")
    for (name, level), style in zip(levels.items(), (":", "--", "-.")):
        ax.axhline(level, color="gray", ls=style, lw=1, label=f"{name} {level:.2f}")
    ax.set(xlabel="env steps", ylabel="success", title=title, ylim=(-0.02, 1.02))
    for key in ("format_error_rate", "readout_acc", "approx_kl", "kl_ref", "explained_var"):
        if key in history[0]:
            ax2.plot(steps, [h[key] for h in history], marker=".", label=key)
    ax2.set(xlabel="env steps", title="diagnostics", ylim=(-0.5, 1.05))
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def finish_run(policy, args, history, before, after, baselines, t0, shape):
    """After the last evaluation: the curve, the final model, summary.json."""
    levels = {"SFT only (sampled)": before["sampled"]["success"], **baselines}
    curve = os.path.join(args.output_dir, "learning_curve.png")
    plot_curve(history, curve, f"{args.task}: PPO after SFT", levels)
    save_final_model(policy, os.path.join(args.output_dir, "final_model"))
    prompt_tokens, image_tokens = shape
    summary = dict(
        task=args.task, model=args.model, seed=args.seed, prompt_tokens=prompt_tokens,
        image_tokens=image_tokens, eval_success_before_rl=before["sampled"]["success"],
        eval_success_after_rl=after["sampled"]["success"],
        eval_greedy_success_before_rl=before["greedy"]["success"],
        eval_greedy_success_after_rl=after["greedy"]["success"],
        random_success=baselines["random"], oracle_success=baselines["oracle"],
        env_steps=args.num_updates * args.batch_size * WORLD, wall_seconds=time.time() - t0,
        before=before, after=after,
    )  # fmt: skip
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_table(args, before, after, baselines)
    print(f"{summary['env_steps']} env steps in {summary['wall_seconds']:.0f} s; outputs in "
          f"{args.output_dir}/")  # fmt: skip
    return summary


def baseline_success(args, eval_seed):
    """Success of the random and the oracle policy on the run's eval seeds (from eval_seed on)."""
    out = {}
    for kind in ("random", "oracle"):
        rng, wins = np.random.default_rng(args.seed), 0
        for seed in range(eval_seed, eval_seed + args.eval_episodes):
            env = envs.TASKS[args.task]()
            env.reset(seed=seed)
            total, done = 0.0, False
            while not done:
                n = env.action_space.n
                action = env.oracle() if kind == "oracle" else int(rng.integers(n))
                _, reward, terminated, truncated, _ = env.step(action)
                total, done = total + reward, terminated or truncated
            wins += total > 0
        out[kind] = wins / args.eval_episodes
    return out


def print_before(before, baselines):
    if RANK == 0:
        print(
            f"before RL: success {before['sampled']['success']:.2f} sampled, "
            f"{before['greedy']['success']:.2f} greedy | read-out "
            f"{before['sampled']['readout_acc']:.2f} | random {baselines['random']:.2f} | "
            f"oracle {baselines['oracle']:.2f}",
            flush=True,
        )


def print_table(args, before, after, baselines):
    """The run's result: success before and after RL beside the random and oracle policies."""
    print(
        f"\n{f'eval success ({args.eval_episodes} episodes)':34s} "
        f"{'before RL':>10s} {'after RL':>10s}"
    )
    for mode in ("sampled", "greedy"):
        label = f"  sampled (T={args.temperature})" if mode == "sampled" else "  greedy"
        print(f"{label:34s} {before[mode]['success']:10.2f} {after[mode]['success']:10.2f}")
    read = before["sampled"]["readout_acc"], after["sampled"]["readout_acc"]
    print(f"{'  read-out accuracy (sampled)':34s} {read[0]:10.2f} {read[1]:10.2f}")
    print(
        f"{'  random policy / oracle':34s} {baselines['random']:10.2f} {baselines['oracle']:10.2f}"
    )
    # p over n episodes has a standard error sqrt(p (1 - p) / n), at most 0.5 / sqrt(n)
    n = args.eval_episodes
    print(f"  (over {n} episodes a success rate's standard error is up to {0.5 / n**0.5:.3f})")


def prompt_shape(policy, frame, prompt):
    """(prompt tokens, image tokens) of one prompt: the longest part of a sequence."""
    ids = policy.encode_prompts([frame], [prompt])["input_ids"][0]
    return len(ids), int((ids == policy.vlm.config.image_token_id).sum())


# ---- ONE GPU: will training fit, and --dry-run ----
def memory_estimate(policy, args, batch, shape):
    """Rough training memory in bytes for `batch` sequences per forward/backward. Weights as
    loaded; gradients of the trainable parameters, Adam's two moments in fp32, and fp32 copies
    (and their gradients, in the step) of those stored in a lower precision (parallel.Adam);
    activations of the language model after Korthikanti et al. 2022 (about 34 bytes per token per
    hidden unit per layer in 16-bit, or 2 with gradient checkpointing plus one layer recomputed),
    and of the vision tower if it trains (its tokens counted as the image tokens); the fp32 logits
    of the answer tokens; the rollout's KV cache."""
    text = policy.vlm.config.get_text_config()
    vision = getattr(policy.vlm.config, "vision_config", None)
    elem = next(policy.vlm.parameters()).element_size()  # 2 in bf16, 4 in fp32
    trained = [p for p in policy.parameters() if p.requires_grad]
    trainable = sum(p.numel() * p.element_size() for p in trained)
    prompt_tokens, image_tokens = shape  # prompt_shape
    seq, h, layers = prompt_tokens + args.max_new_tokens, text.hidden_size, text.num_hidden_layers

    def kept(n):  # layers' worth of activations kept for the backward pass
        return 1 + (n - 1) * 2 / 34 if args.gradient_checkpointing else n

    activations = batch * 34 * seq * h * elem / 2 * kept(layers)
    tower_trains = any(p.requires_grad for n, p in policy.vlm.named_parameters() if "vision" in n)
    if vision is not None and tower_trains:
        h_v = getattr(vision, "embed_dim", None) or vision.hidden_size
        depth = getattr(vision, "num_hidden_layers", None) or vision.depth
        activations += batch * 34 * image_tokens * h_v * elem / 2 * kept(depth)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    est = {
        "weights": sum(p.numel() * p.element_size() for p in policy.parameters()),
        "gradients": trainable,
        "adam state (fp32)": 2 * 4 * sum(p.numel() for p in trained),
        "fp32 copies": 8 * sum(p.numel() for p in trained if p.dtype != torch.float32),
        "activations": activations,
        "logits (fp32)": 3 * batch * args.max_new_tokens * text.vocab_size * 4,
        "KV cache (rollout)": args.num_envs * seq * layers * 2 * kv_heads * head_dim * elem,
    }
    return {k: int(v) for k, v in est.items()}


def print_memory(policy, args, phase, shape):
    """The estimate for one micro-batch of SFT or RL, and whether this GPU holds it."""
    sft = phase == "SFT"
    batch = min(args.micro_batch_size, args.sft_batch_size) if sft else args.micro_batch_size
    est = memory_estimate(policy, args, batch, shape)
    total_bytes = sum(est.values())

    def size(n):
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    parts = ", ".join(f"{k} {size(v)}" for k, v in est.items())
    line = f"memory estimate for {phase}: {parts} | total {size(total_bytes)}"
    if torch.cuda.is_available():
        free, capacity = torch.cuda.mem_get_info()
        fits = "fits" if total_bytes < free else (
            "may not fit: lower --micro-batch-size or --num-envs, or add --gradient-checkpointing "
            "/ --lora-in-sft"
        )  # fmt: skip
        line += f" | this GPU: {capacity / 2**30:.1f} GiB, {free / 2**30:.1f} free: {fits}"
    print(line, flush=True)
    return est


def dry_run(policy, args, rng, generator, shape, loop):
    """One rollout step of N envs and one PPO minibatch: measured time and peak memory. `loop`:
    the lecture's start_rl, new_envs, rollout, compute_gae and ppo_update (a dict by name)."""
    import resource

    args = dataclasses.replace(
        args, num_steps=1, update_epochs=1, total_steps=args.num_envs, num_minibatches=1,
        micro_batch_size=math.gcd(args.micro_batch_size, args.num_envs),
    )  # fmt: skip
    optimizer = loop["start_rl"](policy, args)
    print_memory(policy, args, "RL", shape)
    vec = loop["new_envs"](args, list(range(args.num_envs)))
    t0 = time.time()
    data = loop["rollout"](policy, vec, args, rng, [], update=1)
    t1 = time.time()
    advantages, returns = loop["compute_gae"](
        data["rewards"], data["values"], data["dones"], data["next_value"], args.gamma,
        args.gae_lambda,
    )  # fmt: skip
    stats = loop["ppo_update"](
        policy, optimizer, data, advantages, returns, args, generator, update=1
    )
    t2 = time.time()
    cuda = torch.cuda.is_available()  # Linux reports the RSS in KiB
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(
        resource.RUSAGE_SELF
    ).ru_maxrss * 1024  # fmt: skip
    print(
        f"dry run: rollout step of {args.num_envs} envs {t1 - t0:.2f} s | PPO update of "
        f"{args.num_envs} samples {t2 - t1:.2f} s | peak memory {peak / 2**30:.2f} GiB "
        f"({'GPU' if cuda else 'process RSS'}) | first ratio - 1 = {stats['first_ratio_dev']:.1e}",
        flush=True,
    )
    return dict(rollout_seconds=t1 - t0, update_seconds=t2 - t1, peak_bytes=peak, **stats)
