"""How sure is a trained NumberLine policy of its move, state by state?

Loads a run's final model and, for each of the 30 (target, current) frames, scores two whole answers
(as SFT writes them, EOS included) with the right thoughts: one with the right move, one with the
wrong move. They share every token up to the move, so at the sampling temperature (0.2)
p = 1 / (1 + exp(logp_wrong - logp_right)) is the chance, between these two answers, that a sample
which read the state right also moves right (the tokens after the move, '"}' and EOS, count too).
Prints p per state. For runs of the default settings (thoughts with the plan, T 0.2).
Run: python results/numberline_policy.py runs/numberline-seed1
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import envs  # noqa: E402
import rl4vlm_min as R  # noqa: E402

run = sys.argv[1]
processor, vlm = R.load_model(os.path.join(run, "final_model"), torch.device("cpu"), torch.float32)
policy = R.Policy(vlm, processor, temperature=0.2, thought_coef=1.0).eval()
tokenizer = processor.tokenizer
sure = {}
for target in range(6):
    for current in range(6):
        if target == current:
            continue
        env = envs.NumberLine()
        env.reset(seed=0)
        env.target, env.current = target, current
        frame, info = env.obs()
        prompt = R.task_prompts(processor, "numberline", [info], True)
        right, wrong = ("+", "-") if target > current else ("-", "+")
        logps = []
        for move in (right, wrong):
            text = R.answer_text("numberline", info, move, True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                logp, *_ = policy.score([frame], prompt, [ids], [[1.0] * len(ids)])
            logps.append(logp.item())
        sure[target, current] = 1 / (1 + np.exp(logps[1] - logps[0]))
        print(f"target {target}, current {current}: p(right move) {sure[target, current]:.3f}")
p = np.array(list(sure.values()))
print(
    f"{run}: mean {p.mean():.3f}, lowest {p.min():.3f}, states under 0.9: {(p < 0.9).sum()} of 30"
)
