"""How much of NumberLine's return variance can any state-value function explain?

Plays NumberLine with a policy that makes the right move with probability q (else the wrong one),
computes each step's discounted return (gamma 0.9, as the default run), and fits the best possible
V(target, current): the mean return of each state. Prints 1 - Var(G - V) / Var(G), the explained
variance that a perfect critic would reach on Monte-Carlo returns. Run: python results/ev_ceiling.py
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import envs  # noqa: E402

rng = np.random.default_rng(0)
for q in (0.6, 0.8, 0.9, 0.95, 0.98, 0.99):
    returns, states = [], []
    for _ in range(4000):
        env = envs.NumberLine()
        env.reset(seed=int(rng.integers(2**31)))
        seen, rewards, done = [], [], False
        while not done:
            seen.append((env.target, env.current))
            action = env.oracle() if rng.random() < q else 1 - env.oracle()
            _, reward, terminated, truncated, _ = env.step(action)
            rewards.append(reward)
            done = terminated or truncated
        g = 0.0
        for t in reversed(range(len(rewards))):
            g = rewards[t] + 0.9 * g
            returns.append(g)
            states.append(seen[t])
    returns = np.array(returns)
    index = {s: i for i, s in enumerate(sorted(set(states)))}
    ids = np.array([index[s] for s in states])
    best_v = (np.bincount(ids, weights=returns) / np.bincount(ids))[ids]  # mean return per state
    ev = 1 - np.var(returns - best_v) / np.var(returns)
    print(
        f"right move with probability {q:.2f}: Var(G) = {returns.var():.3f}, best critic explains {ev:.2f}"
    )
