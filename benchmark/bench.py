"""Benchmarks for rl4vlm-min on the embedded tiny model (CPU): the paper's table, the ablations, speed.

    python benchmark/bench.py            # 4 tasks x 3 seeds, NumberLine's ablations, speed: writes results/RESULTS.md, curves.png
    python benchmark/bench.py --quick    # NumberLine, one seed, short runs: a smoke test of this script (minutes)

Every run is rl4vlm_min.train() with the default settings (SFT warm start, then PPO) plus the flags shown in
the table. Results of each run stay in <out>/runs/<name>/ (summary.json, metrics.jsonl); a finished run is
not run again, so an interrupted benchmark continues where it stopped (a finished run whose settings
differ from today's defaults plus its flags, made by earlier code, is refused: use another --out).
"""

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, HERE)
import checkpoints  # noqa: E402
import envs  # noqa: E402
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
    "thoughts: the state only": ["--thoughts", "state"],  # a game's default thoughts: no row
    "thoughts: the state, then a plan": ["--thoughts", "plan"],
    "lambda 0": ["--thought-coef", "0"],
    "lambda 1": ["--thought-coef", "1"],
}


THOUGHTS = {"plan": "the state, then a plan", "state": "the state only"}


def default_thoughts(task):
    """What the game's thoughts hold by default (EZPoints': the state only; the others': a plan)."""
    return R.GAME_DEFAULTS[task].get("thoughts", R.Args.thoughts)


def run(out, name, argv, train=True):
    """One training run (or its saved result). Returns (summary, metrics rows), or None when the
    run has not finished and train is False (--report-only)."""
    run_dir = os.path.join(out, "runs", name)
    args = R.parse_args([*argv, "--output-dir", run_dir])
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        if not train:
            return None
        print(f"\n=== {name}: python rl4vlm_min.py {' '.join(argv)}", flush=True)
        R.train(args)
    if run_dir not in LOADED:
        check_settings(run_dir, args)
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            LOADED[run_dir] = summary, [json.loads(line) for line in f]
    return LOADED[run_dir]


LOADED = {}  # run folder -> (summary, rows): a run shared by two tables is checked and read once


def check_settings(run_dir, args):
    """A finished run is reused by its folder's name: refuse one trained with other settings (an
    earlier default, say) than today's defaults plus its flags, rather than report it as today's."""
    meta = os.path.join(run_dir, "checkpoint", "meta.json")
    if not os.path.exists(meta):  # a run without its checkpoint cannot be checked: say so
        print(f"bench.py: {run_dir} has no checkpoint/meta.json: its settings are not checked")
        return
    with open(meta) as f:
        saved = json.load(f)["args"]
    now = dataclasses.asdict(args)
    differ = [
        f"{key} {saved[key]!r} (today: {now[key]!r})"
        for key in sorted(saved.keys() & now.keys())
        if key not in ("output_dir", "resume", "dry_run") and saved[key] != now[key]
    ]
    if differ:
        sys.exit(f"bench.py: {run_dir} was trained with {', '.join(differ)}: move it away, or "
                 "give another --out, to train it again")  # fmt: skip


def commit(path):
    """The commit of the checkout that holds `path` (the runs' code), with '+ local changes' if
    its tracked files differ from it."""
    git = ["git", "-C", path if os.path.isdir(path) else HERE]
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


def blackjack_choices(run_dir, deals=400):
    """The trained Blackjack model's greedy action on `deals` fresh deals (seeds unlike training
    and evaluation): the share of hands of total 11 or less that it hits (a hit cannot bust them),
    how many such hands there were, and its agreement with basic strategy (the env's oracle)."""
    args = R.parse_args(["--task", "blackjack", "--output-dir", os.path.join(run_dir, "probe")])
    model = os.path.join(run_dir, "final_model")
    processor, vlm = R.load_model(model, torch.device("cpu"), torch.float32)
    policy = R.Policy(vlm, processor, args.temperature, args.thought_coef, args.value_input)
    rng, low, agree = np.random.default_rng(0), [], []
    for lo in range(0, deals, 50):
        games = [envs.Blackjack() for _ in range(lo, min(lo + 50, deals))]
        first = [g.reset(seed=3 * 10**6 + lo + i) for i, g in enumerate(games)]
        infos, frames = [info for _, info in first], [frame for frame, _ in first]
        actions = R.act(policy, "blackjack", infos, frames, args, rng, greedy=True)[0]
        for game, info, action in zip(games, infos, actions):
            agree.append(action == game.oracle())
            if info["Player Total"] <= 11:
                low.append(action == 1)  # 1 = "hit"
    return float(np.mean(low)), len(low), float(np.mean(agree))


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
        policy, rng, generator, _ = R.setup(args)
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
    # where the time of one default NumberLine update goes (16 envs x 8 steps, minibatch 32)
    small = [] if steps >= 64 else ["--num-envs", "4", "--num-steps", "4", "--update-epochs", "1"]
    size = ["--total-steps", "128" if steps >= 64 else "16", *small]  # --quick: a smaller update
    args = R.parse_args(["--model", model_path, *size, "--output-dir", out_dir])
    policy, rng, generator, _ = R.setup(args)
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
    timers.wrap(checkpoints, "save_checkpoint", "checkpoint")
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
    full = steps >= 64  # --quick: 2 envs, 2 updates, 1 core (a smoke test of the measurement)
    workers = worker_speed(
        model_path, out_dir, num_envs=16 if full else 2, cores=2 if full else 1,
        updates=4 if full else 2,
    )  # fmt: skip
    rows.update(workers)
    return dict(
        throughput=rows,
        batch_ratio=rows["rollout, 16 env(s) per generate"]
        / rows["rollout, 1 env(s) per generate"],
        minibatch_ratio=updates[32] / updates[1],
        worker_ratio=list(workers.values())[1] / list(workers.values())[0],
        breakdown=parts,
        update_seconds=total,
        update=f"{args.num_envs} envs x {args.num_steps} steps, {args.update_epochs} epoch(s)",
    )


def worker_speed(model_path, out_dir, num_envs, cores, updates):
    """Env-steps/s of a whole training update (rollout + PPO) with 1 process of 2 threads vs 2 torchrun workers
    of 1 thread each: the same 2 cores either way (cores=1 in --quick: 1 thread each, a smoke test).
    Each run trains `updates` updates; the rate is the mean over those after the first."""
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
                str(updates * 4 * num_envs * workers),
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


def cell(values, digits=2):
    """mean ± sd of fractions, or the one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def pick(summaries, *keys):
    """summary[keys[0]][keys[1]]... of each run."""
    return [functools.reduce(dict.get, keys, summary) for summary in summaries]


def report(results, ablations, spd, command, wall, threads, episodes, seeds, source, extra):
    """RESULTS.md: the four games, the ablations, Blackjack's hands of 11 or less, the speed."""
    groups = [*results.values(), *(g for v in ablations.values() for g in v.values())]
    runs = {id(s): s for group in groups for s, _ in group.values()}.values()  # each run once
    missing = extra.get("missing", [])
    lines = [
        "# rl4vlm-min benchmark (embedded tiny model, CPU)",
        "",
        f"Made by `{command}` from the runs of commit {source} on {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {threads} torch thread(s) per run. The {len(runs)} training "
        f"runs took {sum(s['wall_seconds'] for s in runs) / 60:.0f} min of wall time together "
        f"(this invocation: {wall / 60:.0f} min). Each run is `python rl4vlm_min.py --task T "
        "--seed S` (each game's defaults) plus the flags shown. Success = summed episode reward > "
        "0 over each game's eval episodes (200; Blackjack 1,000), seeds disjoint from training; "
        f"mean ± sd over the seeds. Sampled at the training temperature ({R.Args().temperature});"
        " greedy = argmax decoding. gain: after RL minus SFT only, sampled. read-out: the share of "
        "steps whose thoughts name the state right (sampled), SFT only -> after RL. ev: the "
        "critic's mean explained variance over the second half of the updates. max fmt: the "
        "largest format-error rate of an update after the second. s: the run's wall seconds "
        "(train(): loading, SFT, both evaluations and RL; Python's start-up not included).",
        "",
    ]
    if not results:
        lines.append("No main table: no game of `--tasks` has a finished run; the ablations only.")
    else:
        lines += [
            "| task | seeds | random | oracle | SFT only (sampled / greedy) | after RL (sampled / "
            "greedy) | gain | read-out | ev | max fmt | s | paper: SFT -> RL (LLaVA-1.6-7B) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for task, group in results.items():
        s, rows = [x for x, _ in group.values()], [r for _, r in group.values()]
        get = functools.partial(pick, s)
        before, after = get("before", "sampled", "success"), get("after", "sampled", "success")
        lines.append(
            f"| {task} | {', '.join(map(str, group))} | {cell(get('random_success'))} | "
            f"{cell(get('oracle_success'))} | {cell(before)} / "
            f"{cell(get('before', 'greedy', 'success'))} | {cell(after)} / "
            f"{cell(get('after', 'greedy', 'success'))} | "
            f"{cell([a - b for a, b in zip(after, before)])} | "
            f"{cell(get('before', 'sampled', 'readout_acc'))} -> "
            f"{cell(get('after', 'sampled', 'readout_acc'))} | {np.mean([ev(r) for r in rows]):+.2f} | "
            f"{max(max_fmt(r) for r in rows):.2f} | {np.mean(get('wall_seconds')):.0f} | "
            f"{PAPER['sft'][task]} -> {PAPER['rl'][task]} |"
        )
    if results:
        lines += [
            "",
            "Per seed (the issue's targets are per seed):",
            "",
            "| task | seed | SFT only (sampled / greedy) | after RL (sampled / greedy) | gain | "
            "read-out | ev | max fmt | s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for task, group in results.items():
        for seed, (s, rows) in group.items():
            b, a = s["before"], s["after"]
            lines.append(
                f"| {task} | {seed} | {b['sampled']['success']:.3f} / "
                f"{b['greedy']['success']:.3f} | {a['sampled']['success']:.3f} / "
                f"{a['greedy']['success']:.3f} | "
                f"{a['sampled']['success'] - b['sampled']['success']:+.3f} | "
                f"{b['sampled']['readout_acc']:.2f} -> {a['sampled']['readout_acc']:.2f} | "
                f"{ev(rows):+.2f} | {max_fmt(rows):.2f} | {s['wall_seconds']:.0f} |"
            )
    if extra.get("blackjack"):
        lines += ["", "Blackjack after RL, greedy, on 400 fresh deals (`blackjack_choices`):", ""]
        for seed, (hit, n, agree) in extra["blackjack"].items():
            lines.append(
                f"- seed {seed}: hits {hit:.2f} of the {n} hands of 11 or less (basic strategy and "
                f"the target: 1.00); agrees with basic strategy on {agree:.2f} of all deals"
            )
    lines += ["", "![learning curves](curves.png)"] if results else []
    for task, variants in ablations.items():
        if not variants:
            continue
        lines += [
            "",
            f"## Ablations on {task} (CoT, thoughts, lambda; its default thoughts: "
            f"{THOUGHTS[default_thoughts(task)]})",
            "",
            "| variant | seeds | SFT only (sampled) | after RL (sampled / greedy) | format errors "
            "after RL | ev | max fmt |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, group in variants.items():
            s, rows = [x for x, _ in group.values()], [r for _, r in group.values()]
            lines.append(
                f"| {name} | {', '.join(map(str, group))} | "
                f"{cell([x['eval_success_before_rl'] for x in s])} | "
                f"{cell([x['eval_success_after_rl'] for x in s])} / "
                f"{cell([x['eval_greedy_success_after_rl'] for x in s])} | "
                f"{cell([x['after']['sampled']['format_error_rate'] for x in s])} | "
                f"{np.mean([ev(r) for r in rows]):+.2f} | {max(max_fmt(r) for r in rows):.2f} |"
            )
    lines += [
        "",
        "Paper: NumberLine with CoT 89.4, without 26.9; EZPoints 50.0 and 29.9; lambda in {0.3, "
        "0.5} learned, 0.1 / 0.7 / 0.9 stayed flat.",
    ]
    if missing:
        missing = ", ".join(dict.fromkeys(missing))  # a default run sits in two tables
        lines += ["", f"Not run (not finished when this report was written): {missing}"]
    if not isinstance(spd, dict):  # None (--no-speed), or a line saying why it was not measured
        return "\n".join(lines + (["", f"Speed: {spd}."] if spd else [])) + "\n"
    lines += [
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
        f"One default NumberLine update ({spd['update']} of minibatch 32): "
        f"{spd['update_seconds']:.1f} s",
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
    flag = parser.add_argument
    flag("--quick", action="store_true", help="short runs (a smoke test); by default NumberLine, "
         "seed 1, its ablations on seed 1 (the games and seeds you name win)")  # fmt: skip
    flag("--seeds", type=int, nargs="+", default=None, help="seeds of the main table (1 2 3)")
    flag("--tasks", nargs="*", default=None, choices=TASKS, help="games of the main table (all; "
         "none: a report of ablations only)")  # fmt: skip
    flag(
        "--numberline-ablation-seeds",
        type=int,
        nargs="*",
        default=None,
        help="NumberLine's (CoT, thoughts, lambda); default: --seeds",
    )
    flag(
        "--ezpoints-ablation-seeds",
        type=int,
        nargs="*",
        default=None,
        help="EZPoints' (CoT, thoughts, lambda); default: 1 (--quick: none)",
    )
    flag("--blackjack-ablation-seeds", type=int, nargs="*", default=[], help="Blackjack's")
    flag("--out", default="results", help="where RESULTS.md, curves.png and runs/ go")
    flag("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    flag(
        "--runs-only", action="store_true", help="train (or reuse) the runs, no speed measurement "
        "and no report: for running seeds in parallel processes before one last invocation reports"
    )  # fmt: skip
    flag("--report-only", action="store_true", help="no training: report the finished runs")
    flag("--no-speed", action="store_true", help="leave the speed measurement out of the report")
    opts = parser.parse_args(argv)
    LOADED.clear()  # each invocation reads (and checks) its runs afresh
    torch.set_num_threads(opts.threads)
    t0, source, train = time.time(), commit(opts.out), not opts.report_only

    def given(value, default, quick):  # a flag typed wins; else --quick's default or the full one
        return value if value is not None else (quick if opts.quick else default)

    tasks = given(opts.tasks, TASKS, ["numberline"])
    seeds = given(opts.seeds, [1, 2, 3], [1])
    ablation_seeds = {"numberline": given(opts.numberline_ablation_seeds, seeds, seeds),
                      "ezpoints": given(opts.ezpoints_ablation_seeds, [1], []),
                      "blackjack": opts.blackjack_ablation_seeds}  # fmt: skip
    extra = []
    if opts.quick:
        extra = "--num-envs 4 --num-steps 4 --total-steps 16 --update-epochs 1 --sft-steps 4 "
        extra = (extra + "--sft-readout-steps 2 --eval-episodes 2 --max-new-tokens 16").split()
    missing = []

    def runs(task, seeds, flags=()):  # {seed: (summary, rows)} of the runs that exist
        found, flags = {}, list(flags)
        if default_thoughts(task) != "plan" and "--thoughts" not in flags:
            # the folder names the thoughts: a run of the earlier EZPoints default (the plan)
            # is never taken for one of today's (`run` reuses any finished folder by its name)
            flags = ["--thoughts", default_thoughts(task), *flags]
        for seed in seeds:
            name = "-".join([task, *(f.strip("-") for f in flags), f"seed{seed}"])
            argv = ["--task", task, "--seed", str(seed), *flags, *extra]
            result = run(opts.out, name, argv, train)
            if result is None:
                missing.append(name)
            else:
                found[seed] = result
        return found

    results = {task: runs(task, seeds) for task in tasks}
    variants = {k: v for k, v in ABLATIONS.items() if not (opts.quick and k == "lambda 0")}
    ablations = {  # (--quick: lambda 1 alone, to keep the test suite short)
        task: {
            name: runs(task, task_seeds, flags)
            for name, flags in variants.items()
            if flags[:1] != ["--thoughts"] or flags[1] != default_thoughts(task)
        }
        for task, task_seeds in ablation_seeds.items()
        if task_seeds
    }
    if opts.runs_only:
        return
    results = {task: group for task, group in results.items() if group}
    for task in ablations:
        ablations[task] = {name: group for name, group in ablations[task].items() if group}
    black = {}
    for seed in results.get("blackjack", {}):
        black[seed] = blackjack_choices(os.path.join(opts.out, "runs", f"blackjack-seed{seed}"))
    if not results and not any(ablations.values()):
        hint = (
            "train them (leave out --report-only)" if opts.report_only else "name a game or seeds"
        )
        sys.exit(f"bench.py: no finished run under {opts.out}/runs for the games and seeds named "
                 f"(--tasks, --seeds, --*-ablation-seeds): {hint}")  # fmt: skip
    spd = None  # measured with the main table's first NumberLine run, if the report has one
    if not opts.no_speed and seeds[0] in results.get("numberline", {}):
        model = os.path.join(opts.out, "runs", f"numberline-seed{seeds[0]}", "final_model")
        spd = speed(model, os.path.join(opts.out, "runs", "speed"), 16 if opts.quick else 64)
    elif not opts.no_speed:
        spd = f"not measured: it needs the main table's NumberLine run of seed {seeds[0]}"
    os.makedirs(opts.out, exist_ok=True)
    if results:  # the learning curves of the main table's runs
        curves(results, os.path.join(opts.out, "curves.png"))
    command = " ".join(["python benchmark/bench.py", *(argv if argv is not None else sys.argv[1:])])
    text = report(
        results, ablations, spd, command, time.time() - t0, opts.threads,
        2 if opts.quick else R.Args().eval_episodes, seeds, source,
        dict(missing=missing, blackjack=black),
    )  # fmt: skip
    with open(os.path.join(opts.out, "RESULTS.md"), "w") as f:
        f.write(text)
    wrote = "RESULTS.md and curves.png" if results else "RESULTS.md (no main-table runs: no curves)"
    print(f"wrote {opts.out}/{wrote} in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main(sys.argv[1:])
