"""EZPoints: how likely is the operator that wins, once the first number is written?

For each pair of card values EZPoints deals (13 pairs; four make 12 only with *: 2 and 6, 3 and
4, either order), sets up one state after the first card's number is written and scores all 13
whole answers (right thoughts, then each action, then '"}' and EOS) under a run's final model
(or, with --sft, the SFT model the run saved). The answers share every token before the action, so
a softmax over their log-probs at temperature T is the chance, among these 13 well-formed answers,
that a sample writes each action (answers that misread the cards or run on past '"}' are left
out). Prints, per pair, the chance of the right operator at the run's sampling temperature and at
T 1, and the action the policy favours: a chance near 0.001 at T 0.2 is an operator that RL's
rollouts hardly ever try. For runs with thoughts (not --no-cot).
Run: python results/ezpoints_operator.py runs/ezpoints-seed1 [--sft]
"""

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import envs  # noqa: E402
import rl4vlm_min as R  # noqa: E402

FIRST_SEED = 3 * 10**6  # seeds no run trains or evaluates on (as ezpoints_deals.py)


def states_after_first_number():
    """One (frame, info) per pair of card values, after the first card's number is written."""
    found, seed = {}, FIRST_SEED
    while len(found) < 13:
        env = envs.EZPoints()
        env.reset(seed=seed)
        seed += 1
        pair = tuple(env.numbers())
        if pair not in found:  # write the first card's number
            frame, _, _, _, info = env.step(envs.EZPoints.action_names.index(str(pair[0])))
            found[pair] = frame, info
    return dict(sorted(found.items()))


def main():
    run, sft = sys.argv[1], "--sft" in sys.argv[2:]
    with open(os.path.join(run, "checkpoint", "meta.json")) as f:
        saved = json.load(f)["args"]
    if not saved["cot"]:
        sys.exit(f"{run} was trained with --no-cot: this script scores answers with thoughts")
    thoughts, T = saved.get("thoughts", "plan"), saved["temperature"]
    model = os.path.join(run, "sft_model" if sft else "final_model")
    processor, vlm = R.load_model(model, torch.device("cpu"), torch.float32)
    policy = R.Policy(vlm, processor, temperature=T, thought_coef=1.0).eval()
    tokenizer, names = processor.tokenizer, envs.EZPoints.action_names
    print(f"{model} (thoughts: {thoughts}): chance of the right operator after the first number")
    sure = {"sum": [], "product": []}
    for (a, b), (frame, info) in states_after_first_number().items():
        right = "+" if a + b == 12 else "*"
        prompt = R.task_prompts(processor, "ezpoints", [info], True)
        answers = []
        for name in names:
            text = R.answer_text("ezpoints", info, name, True, thoughts)
            answers.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [policy.eos_id])
        ones = [[1.0] * len(x) for x in answers]
        with torch.no_grad():  # (13,) log-probs of the whole answers at T, then at T 1
            pT, p1 = (policy.score([frame] * 13, prompt * 13, answers, ones, temperature=t)[0]
                      .double().softmax(0) for t in (T, 1.0))  # fmt: skip
        top = names[int(pT.argmax())]
        sure["sum" if right == "+" else "product"].append(pT[names.index(right)].item())
        print(f"  {a:>2} {b:>2} (needs {right}): T {T} {pT[names.index(right)]:.4f}, "
              f"T 1 {p1[names.index(right)]:.3f}; favoured {top!r} {pT.max():.3f}")  # fmt: skip
    for kind, p in sure.items():
        print(f"  {kind} pairs: mean chance at T {T} {np.mean(p):.4f}, lowest {np.min(p):.4f}")


if __name__ == "__main__":
    main()
