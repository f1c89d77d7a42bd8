"""How much does Blackjack's success move from one block of 1,000 deals to the next?

Plays fixed rules (basic strategy, "hit on 11 or less", ...) on 20,000 deals (seeds 3 x 10**6 on)
and on the evaluation's own block (seeds 10**6 .. 10**6 + 999), and prints each rule's mean, the
spread over blocks of 1,000 and its score on the eval block. Given run folders' final models, it
also evaluates them (sampled and greedy, the run's temperature) on the first 10,000 of those
deals. Run: python results/blackjack_blocks.py [runs/blackjack-seed1/final_model ...]
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import envs  # noqa: E402
import rl4vlm_min as rl  # noqa: E402

BASE, N, BLOCK = 3 * 10**6, 20_000, 1_000


def play(rule, seeds):
    """Success (summed reward > 0) of each deal under a rule: env -> 0 stand, 1 hit."""
    wins = []
    for seed in seeds:
        env, total, done = envs.Blackjack(), 0.0, False
        env.reset(seed=seed)
        while not done:
            _, reward, done, _, _ = env.step(rule(env))
            total += reward
        wins.append(total > 0)
    return np.array(wins)


def player(env):
    return envs.hand_total(env.player)[0]


def up(env):  # the dealer's visible card, an ace as 11
    return envs.hand_total(env.dealer[:1])[0]


RULES = {
    "basic strategy (oracle)": lambda env: env.oracle(),
    "hit <= 11; 12-16 hit vs 7+": lambda env: int(
        player(env) <= 11 or (player(env) <= 16 and up(env) >= 7)
    ),
    "hit <= 11, else stand": lambda env: int(player(env) <= 11),
    "always stand": lambda env: 0,
}

for name, rule in RULES.items():
    wins = play(rule, range(BASE, BASE + N))
    blocks = wins.reshape(-1, BLOCK).mean(1)
    eval_block = play(rule, range(rl.EVAL_SEED, rl.EVAL_SEED + BLOCK)).mean()
    print(
        f"{name:28s} {wins.mean():.3f} (SE {wins.std() / np.sqrt(N):.4f}) over {N:,} | blocks of "
        f"{BLOCK:,}: {blocks.min():.3f}-{blocks.max():.3f}, {(blocks >= 0.4).sum()} of "
        f"{len(blocks)} >= 0.40 | eval block {eval_block:.3f}"
    )

rl.EVAL_SEED = BASE  # evaluate() plays seeds EVAL_SEED on
for path in sys.argv[1:]:
    args = rl.parse_args(["--task", "blackjack", "--model", path, "--eval-episodes", "10000"])
    processor, vlm = rl.load_model(path, torch.device("cpu"), torch.float32)
    policy = rl.Policy(vlm, processor, args.temperature, args.thought_coef)
    torch.manual_seed(1)  # sampling in generate()
    for greedy in (False, True):
        result = rl.evaluate(policy, args, greedy, np.random.default_rng(1))
        mode = "greedy" if greedy else "sampled"
        print(
            f"{path} {mode}: {result['success']:.3f} on 10,000 | read-out {result['readout_acc']:.2f}"
        )
