"""Benchmarks for rl4vlm-min on the embedded tiny model (CPU): the paper's table, its two ablations, speed.

    python benchmark/bench.py            # 4 tasks x 3 seeds, NumberLine ablations, speed: writes results/RESULTS.md, curves.png
    python benchmark/bench.py --quick    # NumberLine, one seed, short runs: a smoke test of this script (minutes)

Every run is rl4vlm_min.train() with the default settings (SFT warm start, then PPO) plus the flags shown in
the table. Results of each run stay in <out>/runs/<name>/ (summary.json, metrics.jsonl); a finished run is
not run again, so an interrupted benchmark continues where it stopped.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, HERE)
import envs  # noqa: E402
import plumbing as P  # noqa: E402
import rl4vlm_min as R  # noqa: E402

TASKS = ["numberline", "ezpoints", "points24", "blackjack"]
PAPER = {  # success %, RL4VLM_FACTS.md §4 (LLaVA-1.6-7B)
    "sft": {"numberline": 24.8, "ezpoints": 23.0, "points24": 2.6, "blackjack": 23.1},
    "rl": {"numberline": 89.4, "ezpoints": 50.0, "points24": 2.3, "blackjack": 40.2},
    "no_cot": {"numberline": 26.9, "ezpoints": 29.9, "points24": 0.0, "blackjack": 40.4},
}
ABLATIONS = {
    "CoT, lambda 0.5 (default)": [],
    "no CoT": ["--no-cot"],
    "lambda 0": ["--thought-coef", "0"],
    "lambda 1": ["--thought-coef", "1"],
}


def run(out, name, argv):
    """One training run (or its saved result). Returns (summary, metrics rows)."""
    run_dir = os.path.join(out, "runs", name)
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        print(f"\n=== {name}: python rl4vlm_min.py {' '.join(argv)}", flush=True)
        R.train(R.parse_args([*argv, "--output-dir", run_dir]))
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return summary, [json.loads(line) for line in f]


def commit():
    """The commit the figures come from (with '+ local changes' if the tree differs from it)."""
    git = ["git", "-C", HERE]
    head = subprocess.run([*git, "log", "-1", "--format=%h"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return (head.stdout.strip() or "unknown") + (" + local changes" if dirty.stdout.strip() else "")


def ev(rows):
    """Mean explained variance over the second half of a run's updates."""
    half = rows[len(rows) // 2 :]
    values = [r["explained_var"] for r in half if r["explained_var"] == r["explained_var"]]
    return float(np.mean(values)) if values else float("nan")  # nan: every return was the same


def max_fmt(rows):
    """The largest format-error rate of an update after the second."""
    return max([r["format_error_rate"] for r in rows[2:]], default=0.0)


def mean_sd(values):
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


# ---- SPEED: rollout throughput vs batch width, PPO update vs minibatch size, where an update's time goes ----
class Timers:
    """Wraps functions so that their wall time adds up under a name."""

    def __init__(self):
        self.total, self.undo = {}, []

    def wrap(self, owner, attr, name):
        real = getattr(owner, attr)

        def timed(*a, **k):
            key = name(*a, **k) if callable(name) else name
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.total[key] = self.total.get(key, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)
        self.undo.append((owner, attr, real))

    def restore(self):
        for owner, attr, real in reversed(self.undo):
            setattr(owner, attr, real)


def speed(model_path, out_dir, steps):
    """Ratios measured in one process on the same (trained) tiny model, torch threads as set by the caller."""

    def make(num_envs, num_steps, minibatch):
        args = R.parse_args(
            [
                "--model",
                model_path,
                "--num-envs",
                str(num_envs),
                "--num-steps",
                str(num_steps),
                "--num-minibatches",
                str(num_envs * num_steps // minibatch),
                "--micro-batch-size",
                str(minibatch),
                "--update-epochs",
                "1",
                "--total-steps",
                str(num_envs * num_steps),
                "--output-dir",
                out_dir,
            ]
        )
        policy, rng, generator = R.setup(args)
        optimizer = R.start_rl(policy, args)
        vec = dict(
            envs=[envs.TASKS[args.task]() for _ in range(num_envs)],
            ep_return=[0.0] * num_envs,
            ep_len=[0] * num_envs,
        )
        first = [env.reset(seed=1000 + i) for i, env in enumerate(vec["envs"])]
        vec["obs"], vec["infos"] = [o for o, _ in first], [i for _, i in first]
        return args, policy, optimizer, vec, rng, generator

    rows = {}
    for n in (1, 4, 16):  # rollout env-steps/s with n envs in one batched generate
        args, policy, _, vec, rng, _ = make(n, max(steps // n, 1), 1)
        t = time.perf_counter()
        R.rollout(policy, vec, args, rng, [])
        rows[f"rollout, {n} env(s) per generate"] = args.batch_size / (time.perf_counter() - t)
    updates = {}
    for mb in (32, 1):  # one PPO epoch over the same 32 samples, minibatch 32 vs 1
        args, policy, optimizer, vec, rng, generator = make(16, 2, mb)
        data = R.rollout(policy, vec, args, rng, [])
        adv, ret = R.compute_gae(
            data["rewards"],
            data["values"],
            data["dones"],
            data["next_value"],
            args.gamma,
            args.gae_lambda,
        )
        t = time.perf_counter()
        R.ppo_update(policy, optimizer, data, adv, ret, args, generator, 1)
        updates[mb] = args.batch_size / (time.perf_counter() - t)
        rows[f"PPO update, minibatch {mb} (samples/s)"] = updates[mb]
    # where the time of one default update goes (16 envs x 8 steps, 4 epochs, minibatch 32)
    args = R.parse_args(["--model", model_path, "--total-steps", "128", "--output-dir", out_dir])
    policy, rng, generator = R.setup(args)
    optimizer = R.start_rl(policy, args)
    timers = Timers()
    timers.wrap(R.Policy, "generate", "generation (batched generate)")

    def score_part(*a, reference=False, **k):
        if reference:  # inside the update: the frozen SFT policy for the KL penalty
            return "PPO: KL reference scoring (no grad)"
        return "PPO forward (scoring with grad)" if torch.is_grad_enabled() else "rollout scoring"

    timers.wrap(R.Policy, "score", score_part)
    timers.wrap(R.Policy, "value", "rollout scoring")
    timers.wrap(R, "ppo_update", "PPO update in total")
    timers.wrap(P, "save_checkpoint", "checkpoint")
    for cls in envs.TASKS.values():
        timers.wrap(cls, "step", "env stepping")
    t = time.perf_counter()
    try:
        R.ppo_loop(policy, optimizer, args, rng, generator)
    finally:
        timers.restore()
    total = time.perf_counter() - t
    parts = dict(timers.total)
    in_update = ("PPO forward (scoring with grad)", "PPO: KL reference scoring (no grad)")
    update_total = parts.pop("PPO update in total")
    parts["PPO backward + optimizer step"] = update_total - sum(
        parts.get(k, 0.0) for k in in_update
    )
    parts["other (prompts, parsing, GAE, logging)"] = total - sum(parts.values())
    workers = worker_speed(
        model_path, out_dir, num_envs=16 if steps >= 64 else 4, cores=2 if steps >= 64 else 1
    )
    rows.update(workers)
    return dict(
        throughput=rows,
        batch_ratio=rows["rollout, 16 env(s) per generate"]
        / rows["rollout, 1 env(s) per generate"],
        minibatch_ratio=updates[32] / updates[1],
        worker_ratio=list(workers.values())[1] / list(workers.values())[0],
        breakdown=parts,
        update_seconds=total,
    )


def worker_speed(model_path, out_dir, num_envs, cores):
    """Env-steps/s of a whole training update (rollout + PPO) with 1 process of 2 threads vs 2 torchrun workers
    of 1 thread each: the same 2 cores either way (cores=1 in --quick: 1 thread each, a smoke test).
    Mean over the updates after the first."""
    rows = {}
    for workers in (1, 2):
        run_dir = os.path.join(out_dir, f"workers{workers}")
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(max(cores // workers, 1)))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(workers),
                "rl4vlm_min.py",
                "--model",
                model_path,
                "--sft-steps",
                "0",
                "--eval-episodes",
                "1",
                "--num-envs",
                str(num_envs),
                "--num-steps",
                "4",
                "--num-minibatches",
                "4",
                "--micro-batch-size",
                str(num_envs),
                "--total-steps",
                str(4 * 4 * num_envs * workers),
                "--output-dir",
                run_dir,
            ],
            check=True,
            env=env,
            capture_output=True,
            cwd=HERE,
        )
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rates = [json.loads(line)["steps_per_second"] for line in f][1:]
        rows[
            f"training, {workers} torchrun worker(s) x {max(cores // workers, 1)} thread(s), env-steps/s"
        ] = float(np.mean(rates))
    return rows


# ---- REPORT ----
def curves(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.4 * len(results), 3), squeeze=False)
    for ax, (task, runs) in zip(axes[0], results.items()):
        for seed, (_summary, rows) in runs.items():
            ax.plot(
                [r["env_steps"] for r in rows],
                [r["success"] for r in rows],
                label=f"seed {seed}",
                lw=1.2,
            )
        sft = np.mean([summary["eval_success_before_rl"] for summary, _ in runs.values()])
        ax.axhline(sft, color="gray", ls="--", lw=1, label=f"SFT only {sft:.2f}")
        ax.axhline(PAPER["rl"][task] / 100, color="k", ls=":", lw=1, label="paper after RL (7B)")
        ax.set(title=task, xlabel="env steps", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training success (last 100 episodes)")
    for ax in axes[0]:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(results, ablations, spd, command, wall, threads, episodes, seeds, source):
    runs = {
        id(s): s for group in (results, ablations) for r in group.values() for s, _ in r.values()
    }.values()
    lines = [
        "# rl4vlm-min benchmark (embedded tiny model, CPU)",
        "",
        f"Made by `{command}` at commit {source} on {os.cpu_count()} CPU cores, torch {torch.__version__}, {threads} torch thread(s). "
        f"The {len(runs)} training runs took {sum(s['wall_seconds'] for s in runs) / 60:.0f} min of wall time "
        f"together (runs already finished are reused; this invocation took {wall / 60:.0f} min). Success = summed episode reward > 0 over {episodes} fixed eval episodes "
        f"(seeds disjoint from training); mean ± sd over seeds {', '.join(map(str, seeds))}. Sampled at the "
        f"training temperature ({R.Args().temperature}); greedy = argmax decoding. ev: the critic's mean explained "
        "variance over the second half of the updates; max fmt_err: the largest format-error rate of an update after "
        "the second; wall: seconds of the whole command per run.",
        "",
        "| task | random | oracle | SFT only (sampled) | after RL (sampled) | after RL (greedy) | read-out after RL | "
        "ev | max fmt_err | wall (s) | paper: SFT -> RL (LLaVA-1.6-7B) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, runs in results.items():
        s = [summary for summary, _ in runs.values()]
        lines.append(
            f"| {task} | {mean_sd([x['random_success'] for x in s])} | {mean_sd([x['oracle_success'] for x in s])} | "
            f"{mean_sd([x['eval_success_before_rl'] for x in s])} | {mean_sd([x['eval_success_after_rl'] for x in s])} | "
            f"{mean_sd([x['eval_greedy_success_after_rl'] for x in s])} | "
            f"{mean_sd([x['after']['sampled']['readout_acc'] for x in s])} | "
            f"{np.mean([ev(rows) for _, rows in runs.values()]):+.2f} | "
            f"{max(max_fmt(rows) for _, rows in runs.values()):.2f} | "
            f"{np.mean([x['wall_seconds'] for x in s]):.0f} | "
            f"{PAPER['sft'][task]} -> {PAPER['rl'][task]} |"
        )
    lines += ["", "Per seed (sampled success, SFT only -> after RL):", ""]
    for task, runs in results.items():
        lines.append(
            f"- {task}: "
            + "; ".join(
                f"seed {seed} {s['eval_success_before_rl']:.2f} -> {s['eval_success_after_rl']:.2f}"
                for seed, (s, _) in runs.items()
            )
        )
    lines += [
        "",
        "![learning curves](curves.png)",
        "",
        "## Ablations on NumberLine (same seeds)",
        "",
        "| variant | SFT only (sampled) | after RL (sampled) | after RL (greedy) | format errors after RL |",
        "|---|---|---|---|---|",
    ]
    for name, runs in ablations.items():
        s = [summary for summary, _ in runs.values()]
        lines.append(
            f"| {name} | {mean_sd([x['eval_success_before_rl'] for x in s])} | {mean_sd([x['eval_success_after_rl'] for x in s])} | "
            f"{mean_sd([x['eval_greedy_success_after_rl'] for x in s])} | "
            f"{mean_sd([x['after']['sampled']['format_error_rate'] for x in s])} |"
        )
    lines += [
        "",
        "Paper: with CoT 89.4, without 26.9 (NumberLine); lambda in {0.3, 0.5} learned, 0.1 / 0.7 / 0.9 stayed flat.",
        "",
        "## Speed (one process, the NumberLine model trained above)",
        "",
        "| measurement | rate |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in spd["throughput"].items()]
    lines += [
        "",
        f"Batched rollout, 16 envs vs 1 env per generate: **{spd['batch_ratio']:.1f}x** env-steps/s. "
        f"PPO update, minibatch 32 vs 1: **{spd['minibatch_ratio']:.1f}x** samples/s. "
        f"Training with 2 torchrun workers (1 thread each) vs 1 process (2 threads) on the same 2 cores: "
        f"**{spd['worker_ratio']:.2f}x** env-steps/s.",
        "",
        f"One default update (16 envs x 8 steps, 4 epochs of minibatch 32): {spd['update_seconds']:.1f} s",
        "",
        "| part | seconds | share |",
        "|---|---|---|",
    ]
    lines += [
        f"| {k} | {v:.2f} | {100 * v / spd['update_seconds']:.0f}% |"
        for k, v in spd["breakdown"].items()
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="NumberLine, one seed, short runs (a smoke test, minutes)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the full benchmark"
    )
    parser.add_argument(
        "--out", default="results", help="where RESULTS.md, curves.png and runs/ go"
    )
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads"
    )
    parser.add_argument(
        "--runs-only",
        action="store_true",
        help="train (or reuse) the runs, no speed measurement and no report: for running the seeds "
        "in parallel processes before one last invocation writes the report",
    )
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    t0, source = time.time(), commit()  # the code the runs start from
    tasks, seeds, extra = TASKS, opts.seeds, []
    if opts.quick:
        tasks, seeds = ["numberline"], [1]
        extra = [
            "--pretrain-steps",
            "0",
            "--num-envs",
            "4",
            "--total-steps",
            "32",
            "--sft-steps",
            "4",
            "--sft-readout-steps",
            "2",
            "--eval-episodes",
            "2",
            "--max-new-tokens",
            "16",
        ]
    results = {
        task: {
            seed: run(opts.out, f"{task}-seed{seed}", ["--task", task, "--seed", str(seed), *extra])
            for seed in seeds
        }
        for task in tasks
    }
    ablations = {
        name: {
            seed: (
                results["numberline"][seed]
                if not flags
                else run(
                    opts.out,
                    f"numberline-{'-'.join(f.strip('-') for f in flags)}-seed{seed}",
                    ["--task", "numberline", "--seed", str(seed), *flags, *extra],
                )
            )
            for seed in seeds
        }
        for name, flags in ABLATIONS.items()
    }
    if opts.runs_only:
        return
    model = os.path.join(opts.out, "runs", f"numberline-seed{seeds[0]}", "final_model")
    spd = speed(model, os.path.join(opts.out, "runs", "speed"), 16 if opts.quick else 64)
    os.makedirs(opts.out, exist_ok=True)
    curves(results, os.path.join(opts.out, "curves.png"))
    command = (
        "python benchmark/bench.py"
        + (" --quick" if opts.quick else "")
        + (f" --threads {opts.threads}")
    )
    with open(os.path.join(opts.out, "RESULTS.md"), "w") as f:
        f.write(
            report(
                results,
                ablations,
                spd,
                command,
                time.time() - t0,
                opts.threads,
                2 if opts.quick else R.Args().eval_episodes,
                seeds,
                source,
            )
        )
    print(
        f"wrote {opts.out}/RESULTS.md and {opts.out}/curves.png in {(time.time() - t0) / 60:.1f} min"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
