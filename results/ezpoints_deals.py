"""EZPoints by kind of deal: where a policy wins, and what it writes after the first number.

Loads a run's final model (or, with --sft, the SFT model the run saved) and plays N episodes
(default 1,000) from seeds 3 * 10**6 on, which no run trains or evaluates on. Four of EZPoints'
19 deals make 12 only with * (2 and 6, 3 and 4, either order); the others with +. Prints the
sampled and greedy success on each kind; at the first step, how often the action writes the
first number of the formula its thoughts plan; at the step after a right first number, how often
the thoughts plan the right formula and which operator the action writes (the last two for a
run whose thoughts hold a plan: not --no-cot, not --thoughts state).
Run: python results/ezpoints_deals.py runs/ezpoints-seed1 [N] [--sft]
"""

import collections
import json
import os
import re
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import envs  # noqa: E402
import rl4vlm_min as R  # noqa: E402

FIRST_SEED = 3 * 10**6


def kind(numbers):
    return "sum" if sum(numbers) == 12 else "product"


def play(policy, args, seeds, greedy, rng, chunk=256):
    """Per kind of deal: successes, first steps (the action writes the planned first number), and
    (planned formula right, action written) counts at the step whose formula is one right number;
    per deal: (success, the actions written) of each episode."""
    wins, first = collections.defaultdict(list), collections.defaultdict(list)
    deals = collections.defaultdict(list)
    second = collections.defaultdict(collections.Counter)
    for lo in range(0, len(seeds), chunk):
        games = [envs.EZPoints() for _ in seeds[lo : lo + chunk]]
        state = [[*g.reset(seed=s), 0.0, False] for g, s in zip(games, seeds[lo : lo + chunk])]
        written = [[] for _ in games]
        while not all(done for *_, done in state):
            live = [i for i, (*_, done) in enumerate(state) if not done]
            infos, frames = [state[i][1] for i in live], [state[i][0] for i in live]
            actions, _, _, _, texts = R.act(policy, "ezpoints", infos, frames, args, rng, greedy)
            for i, action, text in zip(live, actions, texts):
                info, names = state[i][1], envs.EZPoints.action_names
                plan = envs.EZPoints.plan(info["Numbers"], info["Formula"])
                if games[i].slots == 0:  # the first step: does it write what its thoughts plan?
                    said = re.search(r"(\d+) [+*] \d+ makes 12", text)  # the planned formula
                    first[kind(info["Numbers"])].append(bool(said) and said[1] == names[action])
                if len(info["Formula"]) == 1 and plan:  # the operator's step, on the right path
                    planned = f"{' '.join(plan)} makes 12" in text
                    second[kind(info["Numbers"])][(planned, names[action])] += 1
                written[i].append(names[action])
                obs, reward, terminated, truncated, new_info = games[i].step(action)
                state[i] = [obs, new_info, state[i][2] + reward, terminated or truncated]
        for i, game in enumerate(games):
            wins[kind(game.numbers())].append(state[i][2] > 0)
            deals[tuple(game.numbers())].append((state[i][2] > 0, " ".join(written[i])))
    return wins, first, second, deals


def main():
    run, rest = sys.argv[1], sys.argv[2:]
    sft = "--sft" in rest
    n = int(next((a for a in rest if a.isdigit()), 1000))
    with open(os.path.join(run, "checkpoint", "meta.json")) as f:
        saved = json.load(f)["args"]
    thoughts = saved.get("thoughts", "plan")  # runs older than --thoughts: the plan
    flags = ["--temperature", str(saved["temperature"]), "--thoughts", thoughts]
    args = R.parse_args(["--task", "ezpoints", *flags, *([] if saved["cot"] else ["--no-cot"])])
    plans = saved["cot"] and thoughts == "plan"  # else the thoughts hold no formula
    model = os.path.join(run, "sft_model" if sft else "final_model")
    processor, vlm = R.load_model(model, torch.device("cpu"), torch.float32)
    policy = R.Policy(vlm, processor, args.temperature, args.thought_coef)
    seeds, rng = list(range(FIRST_SEED, FIRST_SEED + n)), np.random.default_rng(0)
    torch.manual_seed(0)  # generate's sampling: the same figures on every call
    print(f"{model}: {n} episodes from seed {FIRST_SEED}")
    for greedy in (False, True):
        wins, first, second, deals = play(policy, args, seeds, greedy, rng)
        mode = "greedy" if greedy else f"sampled (T={args.temperature})"
        total = np.mean([w for k in wins for w in wins[k]])
        print(f"  {mode}: success {total:.3f}")
        for k in ("sum", "product"):
            print(f"    {k} deals ({len(wins[k])}): success {np.mean(wins[k]):.3f}")
            if not plans:
                continue  # --no-cot or --thoughts state: no plan to compare the actions with
            print(f"      first step: the action writes the planned first number "
                  f"{np.mean(first[k]):.2f} ({len(first[k])} steps)")  # fmt: skip
            counts = second[k]
            steps = sum(counts.values())
            planned = sum(c for (ok, _), c in counts.items() if ok) / max(steps, 1)
            ops = collections.Counter()
            for (_, name), c in counts.items():
                ops[name if name in "+*=" else "a number"] += c
            written = ", ".join(f'"{o}" {c / max(steps, 1):.2f}' for o, c in ops.most_common())
            print(f"      after a right first number ({steps} steps): thoughts plan it right "
                  f"{planned:.2f}; the action writes {written}")  # fmt: skip
        print("    by deal (card values as shown): success, the formulas written most often")
        for deal, episodes in sorted(deals.items()):
            often = collections.Counter(formula for _, formula in episodes).most_common(2)
            shown = ", ".join(f'"{f}" {c}' for f, c in often)
            print(f"      {deal[0]:>2} {deal[1]:>2}: {np.mean([w for w, _ in episodes]):.2f} "
                  f"of {len(episodes):>3}; {shown}")  # fmt: skip


if __name__ == "__main__":
    main()
