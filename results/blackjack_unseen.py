"""Blackjack on deals the project never trains or evaluates on, and agreement with basic strategy.

Loads a run's final model and plays N deals (default 10,000) with seeds from 3 * 10**6 on: training
envs take seeds below 10**6 and rl4vlm_min.py's evaluation 10**6 to 10**6 + its episodes. Prints
the sampled (T from the run) and greedy success, the same for basic strategy (envs.Blackjack.oracle)
on the same deals, and how often the policy's action agrees with basic strategy on hard hands of
12-16, by the dealer's visible card (the decisions basic strategy splits on).
Run: python results/blackjack_unseen.py runs/blackjack-seed1 [N]
"""

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import envs  # noqa: E402
import rl4vlm_min as R  # noqa: E402

FIRST_SEED = 3 * 10**6


def play(policy, args, seeds, greedy, rng, chunk=256):
    """Success rate over the deals, and (total, dealer card, agreed) of each hard 12-16 decision."""
    wins, decisions = [], []
    for lo in range(0, len(seeds), chunk):
        games = [envs.Blackjack() for _ in seeds[lo : lo + chunk]]
        state = [[*g.reset(seed=s), 0.0, False] for g, s in zip(games, seeds[lo : lo + chunk])]
        while not all(done for *_, done in state):
            live = [i for i, (*_, done) in enumerate(state) if not done]
            infos, frames = [state[i][1] for i in live], [state[i][0] for i in live]
            actions, *_ = R.act(policy, "blackjack", infos, frames, args, rng, greedy)
            for i, action in zip(live, actions):
                total, soft = envs.hand_total(games[i].player)
                if not soft and 12 <= total <= 16:
                    up = envs.card_value(games[i].dealer[0][0])
                    decisions.append((total, up, action == games[i].oracle()))
                obs, reward, terminated, truncated, info = games[i].step(action)
                state[i] = [obs, info, state[i][2] + reward, terminated or truncated]
        wins += [total > 0 for _, _, total, _ in state]
    return float(np.mean(wins)), decisions


def oracle_success(seeds):
    wins = []
    for seed in seeds:
        game, total, done = envs.Blackjack(), 0.0, False
        game.reset(seed=seed)
        while not done:
            _, reward, done, _, _ = game.step(game.oracle())
            total += reward
        wins.append(total > 0)
    return float(np.mean(wins))


def main():
    run, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    with open(os.path.join(run, "checkpoint", "meta.json")) as f:
        saved = json.load(f)["args"]
    args = R.parse_args(["--task", "blackjack", "--temperature", str(saved["temperature"])])
    model = os.path.join(run, "final_model")
    processor, vlm = R.load_model(model, torch.device("cpu"), torch.float32)
    policy = R.Policy(vlm, processor, args.temperature, args.thought_coef)
    seeds = list(range(FIRST_SEED, FIRST_SEED + n))
    rng = np.random.default_rng(0)
    print(f"{run}: {n} unseen deals; basic strategy wins {oracle_success(seeds):.3f}")
    for greedy in (False, True):
        success, decisions = play(policy, args, seeds, greedy, rng)
        agree = np.mean([ok for *_, ok in decisions])
        print(f"  {'greedy' if greedy else f'sampled (T={args.temperature})'}: success "
              f"{success:.3f} | agrees with basic strategy on hard 12-16: {agree:.3f} "
              f"({len(decisions)} decisions)")  # fmt: skip
        rows = []
        for total in range(12, 17):
            cells = []
            for up in range(1, 11):
                hits = [ok for t, u, ok in decisions if t == total and u == up]
                cells.append(f"{np.mean(hits):.2f}" if hits else "  - ")
            rows.append(f"    {total:2d} | " + " ".join(cells))
        print("    agreement by hard total (rows) and dealer card A, 2..10 (columns)")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
