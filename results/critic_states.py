"""Does a trained value head tell NumberLine's 30 states apart?

Loads a run's final model and value head, computes V(s) for every (target, current) frame with its
prompt, and compares it with the value of a policy that moves right with probability 0.98 (computed
exactly by dynamic programming over the 10-move horizon). Prints the spread of V and the correlation.
Run: python results/critic_states.py runs/numberline-seed1 [mean|last]
"""

import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import envs  # noqa: E402
import rl4vlm_min as R  # noqa: E402


def true_value(target, current, steps_left, q=0.98, gamma=0.9):
    """Expected discounted return from (target, current) with steps_left moves, right move w.p. q."""
    if steps_left == 0:
        return 0.0
    total = 0.0
    for p, move in ((q, 1 if target > current else -1), (1 - q, -1 if target > current else 1)):
        nxt = min(max(current + move, 0), 5)
        if nxt == target:
            total += p * 1.0
        else:
            r = 0.0 if abs(nxt - target) < abs(current - target) else -1.0
            total += p * (r + gamma * true_value(target, nxt, steps_left - 1, q, gamma))
    return total


run, value_input = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "mean")
processor, vlm = R.load_model(os.path.join(run, "final_model"), torch.device("cpu"), torch.float32)
policy = R.Policy(vlm, processor, 0.2, 0.5, value_input)
policy.value_head.load_state_dict(
    load_file(os.path.join(run, "final_model", "value_head.safetensors"))
)
states = [(t, c) for t in range(6) for c in range(6) if t != c]
frames, infos = [], []
for t, c in states:
    env = envs.NumberLine()
    env.reset(seed=0)
    env.target, env.current = t, c
    frame, info = env.obs()
    frames.append(frame)
    infos.append(info)
values = policy.value(frames, R.task_prompts(processor, "numberline", infos, True)).numpy()
truth = np.array([true_value(t, c, 10) for t, c in states])
print(
    f"{run} ({value_input}): V from {values.min():.2f} to {values.max():.2f} (true {truth.min():.2f} to "
    f"{truth.max():.2f}), correlation with the true values {np.corrcoef(values, truth)[0, 1]:.2f}"
)
