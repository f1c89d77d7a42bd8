"""build_tiny_llava.py: the recipe of the embedded tiny LLaVA that `--model tiny` loads.

    python build_tiny_llava.py            # rebuilds tiny-llava/ from scratch: about 17-21 min

The folder tiny-llava/ is a standard Hugging Face checkpoint (config, safetensors, tokenizer,
processor, chat template), loaded with from_pretrained like any other; this script made it and
can make it again. A 7B LLaVA comes pretrained from its authors; this 0.5M-parameter one gets the
same two things in miniature, on frames of the four games, before any task's SFT:
1. the vision tower: a linear probe on every image token learns the value of the card whose rank
   is drawn in that patch (0 none, 11 face down); the probe is then dropped. Without it the
   tower never learned to read four cards (results/EXPERIMENTS.md §1).
2. the whole VLM: answers in the games' JSON format to random states of all four games, each
   with its own prompt, the thoughts reading the state right and the action uniformly random (a
   real VLM knows JSON; taught it first in SFT, the tiny one lost all its reading in SFT's
   first 25 steps and relearned Points24's in 1,000 more: results/EXPERIMENTS.md §17), at a
   constant lr, then settling: a sixth as many steps again with the lr falling linearly to 0.
   Without the settling the model never read "Current: 0" and NumberLine failed on some seeds
   (results/EXPERIMENTS.md §12-13).
So it comes to each game as a real VLM does: it knows the format and sees the state, and has no
preference among the actions.

It runs on one torch thread whatever the machine has: the thread count changes the order of the
float sums, and that alone changed what a build learned (results/EXPERIMENTS.md §12). Another
CPU (or another torch) builds a different model from the same recipe, usually an equally able one
(§16); the model card (tiny-llava/README.md) names the CPU and the versions that built the
shipped one. tiny-llava/recipe.json records the recipe's key: a hash of every setting and of the
code that determines the model (recipe_key); a test fails when the recipe changes and the folder
was not rebuilt. This script imports the lecture (rl4vlm_min.py) for its prompts, answers and
scoring, one way: the lecture only loads the folder.
"""

import argparse
import ast
import hashlib
import inspect
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import textwrap
import time
import types

import numpy as np
import torch
import transformers

import checks
import envs
import rl4vlm_min as rl
from report import readout_accuracy

# ---- THE MODEL: a CLIP-style tower, a Llama-style LM, a word-level tokenizer ----
# The image goes after the text, right before the answer: the answer's first tokens are then at
# fixed distances from each card's image tokens, whatever the prompt's length, and the tiny LM
# learns to read them (image first: Points24's read-out 0.03 against 0.58 after 600 SFT steps).
TINY_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '\n<image>' }}{% endif %}"
    "{% endfor %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


TINY_SPLIT = r" ?[A-Za-z]+| ?\d+| ?[^\w\s]|\s"  # word-level pieces; a space sticks to what follows


TINY_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    image_size=128, patch_size=16,
)  # fmt: skip


def build_tiny_model(path, seed):
    """A 0.5M-parameter LLaVA (CLIP-style tower + Llama-style LM) with a word-level tokenizer,
    saved to `path` with save_pretrained and so loaded exactly like a real checkpoint."""
    tokenizer = tiny_tokenizer()  # a vocabulary of every word the prompts and answers use
    # White maps to 0 (mean 1, std 0.5): with CLIP's mean/std the white background dominates
    # every patch and the tiny tower cannot tell the digits apart (measured while building it).
    px, patch = TINY_VISION["image_size"], TINY_VISION["patch_size"]
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": px}, crop_size={"height": px, "width": px},
        image_mean=[1.0] * 3, image_std=[0.5] * 3,
    )  # fmt: skip
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=TINY_TEMPLATE,
    )  # fmt: skip
    text_config = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**TINY_VISION), text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 3
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_tokenizer():
    """The tiny model's word-level tokenizer: every word of tiny_corpus() and every printable
    character is one token; pad 0, unk 1, bos 2, eos 3, image 4."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    words = set(re.findall(TINY_SPLIT, tiny_corpus())) | {chr(c) for c in range(32, 127)}
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(TINY_SPLIT), behavior="isolated")
    tok.decoder = decoders.Fuse()  # decoding concatenates the pieces: text round-trips exactly
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", padding_side="left", extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    return tokenizer


def tiny_corpus():
    """Every text the tiny model must tokenize (its vocabulary): prompts and answers of random
    states of every game."""
    texts = ["USER: ASSISTANT: \n", " ".join(str(i) for i in range(40))]
    rng = np.random.default_rng(0)
    for task, cls in envs.TASKS.items():
        env = cls()
        texts.append(" ".join(cls.action_names))  # every action after a space, as in formulas
        for seed in range(100):
            _, info = env.reset(seed=seed)
            for _ in range(4):  # a few random moves: formulas and Blackjack totals of later steps
                for cot in (True, False):
                    texts.append(rl.build_prompt(task, info, cls.action_names, cot))
                    texts += [rl.answer_text(task, info, a, cot) for a in cls.action_names]
                _, _, term, trunc, info = env.step(int(rng.integers(len(cls.action_names))))
                if term or trunc:
                    break
    return "\n".join(texts)


# ---- THE PRETRAINING: the vision tower, then answers to all four games ----
# A real LLaVA starts from a CLIP tower trained on images and a projector trained to describe
# them. The tiny model gets both in miniature, on frames of the four games, before any task's SFT:
# 1. the vision tower: a linear probe on every image token learns the value of the card whose rank
#    is drawn in that patch (0 none, 11 face down); the probe is then dropped. Without it the
#    tower never learned to read four cards (results/EXPERIMENTS.md §1).
# 2. the whole VLM: answers in the games' JSON format to random states of all four games, each
#    with its own prompt, the thoughts reading the state right and the action uniformly random (a
#    real VLM knows JSON; taught it first in SFT, the tiny one lost all its reading in SFT's
#    first 25 steps and relearned Points24's in 1,000 more: results/EXPERIMENTS.md §17), at a
#    constant lr, then settling: a sixth as many steps again with the lr falling linearly to 0.
#    Without the settling the model never read "Current: 0" and NumberLine failed on some seeds
#    (results/EXPERIMENTS.md §12-13).
# The result is tiny-llava/, a standard checkpoint; recipe.json records the recipe's key.
TINY_PRETRAIN = dict(seed=0, vision_steps=400, vision_batch=32, batch_size=16, lr=1e-3)


def pretrain_tiny(path, steps):
    """The two stages, in place on the checkpoint at `path`; `steps` of describing (0: none).
    On one torch thread whatever the machine has: the thread count changes the order of the
    float sums, and that alone changed what this build learned (results/EXPERIMENTS.md §12)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        processor, vlm = rl.load_model(path, torch.device("cpu"), torch.float32)
        rng = np.random.default_rng(TINY_PRETRAIN["seed"])
        torch.manual_seed(TINY_PRETRAIN["seed"])
        readout = {}
        if steps > 0:
            pretrain_vision(vlm, processor, rng)
            readout = pretrain_describe(vlm, processor, rng, steps)
        vlm.save_pretrained(path)
    finally:
        torch.set_num_threads(threads)  # the caller keeps the threads it was given
    return readout


def patch_values(env, grid):
    """The vision probe's targets for env's frame: (grid * grid,) card values by patch."""
    rows, _, (w, h), *left = env.table()
    target = torch.zeros(grid * grid, dtype=torch.long)
    for x, y, label, _ in envs.card_places(rows, (w, h), *left):  # the rank: at the card's centre
        value = envs.label_value(label) if label else 11
        row, col = ((y + h / 2 - 4) * grid // envs.FRAME, (x + w / 2) * grid // envs.FRAME)
        target[int(row) * grid + int(col)] = value
    return target


def pretrain_vision(vlm, processor, rng):
    """Stage 1: the tower and a linear probe on its image tokens learn each patch's card value."""
    tower, cfg = vlm.model.vision_tower, TINY_PRETRAIN
    grid = vlm.config.vision_config.image_size // vlm.config.vision_config.patch_size
    probe = torch.nn.Linear(vlm.config.vision_config.hidden_size, 12)
    optimizer = torch.optim.Adam([*tower.parameters(), *probe.parameters()], lr=cfg["lr"])
    games = [envs.EZPoints(), envs.Points24(), envs.Blackjack()]
    for step in range(1, cfg["vision_steps"] + 1):
        frames, targets = [], []
        for _ in range(cfg["vision_batch"]):
            env = games[int(rng.integers(len(games)))]
            env.reset(seed=int(rng.integers(2**31)))
            for _ in range(int(rng.integers(4))):
                _, _, terminated, truncated, _ = env.step(env.oracle())
                if terminated or truncated:
                    env.reset(seed=int(rng.integers(2**31)))
                    break
            frames.append(env.render())
            targets.append(patch_values(env, grid))
        pixels = processor.image_processor(frames, return_tensors="pt")["pixel_values"]
        logits = probe(tower(pixels).last_hidden_state[:, 1:])  # (B, grid*grid, 12): no CLS
        y = torch.stack(targets)  # (B, grid*grid)
        w = 1.0 + 10.0 * (y > 0)  # the few card patches count as much as the table around them
        loss = (torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
                * w).sum() / w.sum()  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == cfg["vision_steps"]:
            hit = (logits.argmax(-1) == y)[y > 0].float().mean()
            print(f"pretrain vision {step:4d}/{cfg['vision_steps']} | loss {loss.item():.3f} | "
                  f"card values read {hit:.2f}", flush=True)  # fmt: skip


def any_action(cls):
    """cls with every action open to its random answers, as when tiny-llava/ was built: EZPoints'
    SFT now draws well-formed moves only (envs.EZPoints.sensible_actions); the build keeps the
    old draw, so the recipe still makes the shipped model."""
    return type(cls.__name__, (cls,), {"sensible_actions": envs.CardEnv.sensible_actions})


def pretrain_describe(vlm, processor, rng, steps):
    """Stage 2: the whole VLM learns to answer every game (read-out right, action random), each
    batch mixing the four. Returns the last greedy read-out of each game (50 held-out states)."""
    cfg = TINY_PRETRAIN
    policy = rl.Policy(vlm, processor, 1.0, 1.0)
    tok = processor.tokenizer
    optimizer = torch.optim.Adam(vlm.parameters(), lr=cfg["lr"])
    games, checks = {}, {}
    for task, game in envs.TASKS.items():  # 50 held-out states per game for the read-out check
        args = types.SimpleNamespace(task=task, cot=True, thoughts="plan", max_new_tokens=48)
        cls = any_action(game)  # its random answers may write any action
        games[task] = args, cls()
        check = rl.sft_answers(args, cls(), np.random.default_rng(10**6), 50, 0.0, tok, True)
        infos = [i for _, i, _ in check]
        checks[task] = (
            [frame for frame, _, _ in check], rl.task_prompts(processor, task, infos, True),
            [rl.thought_text(task, i) for i in infos],
        )  # fmt: skip
    total = steps + steps // 6  # then a settling phase: the lr falls linearly to 0
    for step in range(1, total + 1):
        for group in optimizer.param_groups:
            group["lr"] = cfg["lr"] * min(1.0, (total + 1 - step) / (total - steps + 1))
        frames, prompts, answers = [], [], []
        for i in range(cfg["batch_size"]):
            task = list(games)[(step * cfg["batch_size"] + i) % len(games)]
            args, env = games[task]
            ((frame, info, ids),) = rl.sft_answers(args, env, rng, 1, 0.0, tok)  # random action
            frames.append(frame)
            prompts += rl.task_prompts(processor, task, [info], True)
            answers.append(ids)
        ones = [[1.0] * len(a) for a in answers]
        logprob = policy.score(frames, prompts, answers, ones, temperature=1.0)[0]
        loss = -logprob.sum() / sum(len(a) for a in answers)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == total:
            line = f"pretrain describe {step:4d}/{total} | loss {loss.item():.3f}"
            if step % 500 == 0 or step == total:
                read = {t: readout_accuracy(policy, *checks[t], 48) for t in games}
                line += " | read-out (greedy) " + ", ".join(f"{t} {v:.2f}" for t, v in read.items())
            print(line, flush=True)
    return read


# ---- THE RECIPE'S KEY, THE MODEL CARD, THE BUILD ----
def code_text(obj):
    """The code of a module, class or function as Python reads it: its syntax tree without
    docstrings, written back out (comments and layout are not in the tree). Editing a comment,
    rewrapping a line or moving a function to another module leaves it the same; changing what
    the code does does not."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def recipe_key(steps):
    """A hash of what determines the model: its settings and the code (code_text) that builds it,
    draws the frames (all of envs.py), writes the prompts and answers, loads and scores."""
    code = [envs, tiny_tokenizer, tiny_corpus, build_tiny_model, pretrain_tiny, pretrain_vision,
            patch_values, any_action, pretrain_describe, rl.build_prompt, rl.chat_prompt,
            rl.task_prompts, rl.thought_text, rl.answer_text, rl.sft_answers, rl.load_model,
            rl.Policy.__init__, rl.Policy.encode_prompts, rl.Policy.score, rl.Policy.hidden_states,
            checks.output_logits]  # fmt: skip
    text = json.dumps([TINY_VISION, TINY_TEMPLATE, TINY_SPLIT, TINY_PRETRAIN, rl.GAME_RULES, steps])
    text += "".join(code_text(obj) for obj in code)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cpu_name():
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if names:
            return f"{names[0]} ({len(names)} cores)"
    return platform.processor() or platform.machine()


def write_card(path, key, steps, readout, seconds):
    """recipe.json (what built the folder, read by the tests) and the model card README.md. `key`:
    the recipe's key as the build started (edits to the code during a build do not count)."""
    versions = {m.__name__: m.__version__ for m in (torch, transformers, np)}
    versions["python"] = platform.python_version()
    built = dict(
        key=key, steps=steps, seconds=round(seconds), cpu=cpu_name(),
        torch_threads=1, versions=versions, readout=readout,
    )  # fmt: skip
    with open(os.path.join(path, "recipe.json"), "w") as f:
        json.dump(built, f, indent=1)
    vlm = transformers.AutoModelForImageTextToText.from_pretrained(path)
    n = sum(p.numel() for p in vlm.parameters())
    reads = ", ".join(f"{task} {value:.2f}" for task, value in readout.items())
    card = f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [rl4vlm-min, llava, tiny]
---
# tiny-llava: the embedded model of rl4vlm-min

A {n / 1e6:.2f}M-parameter LLaVA (a CLIP-style vision tower, a Llama-style language model, a
word-level tokenizer of the four card games' prompts and answers) that `python rl4vlm_min.py`
loads with `from_pretrained` when `--model tiny` (the default). It knows only the games: it reads
the state from a frame and answers in their JSON format, with a random action. RL4VLM's SFT and
PPO then teach it to act.

Built by `python build_tiny_llava.py` (recipe key `{key}`, {steps} steps of describing and
{steps // 6} of settling) in {seconds:.0f} s on {built["cpu"]}, one torch thread; Python
{versions["python"]}, torch {versions["torch"]}, transformers {versions["transformers"]}, numpy
{versions["numpy"]}. Another CPU or other versions build another model from the same recipe.

Greedy read-out after the build (the share of answers whose thoughts read the state right, on
50 held-out states per game): {reads}.
"""
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(card)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Rebuild the embedded tiny LLaVA from scratch.")
    parser.add_argument("--out", default=rl.TINY_MODEL, help="the folder to (re)write")
    parser.add_argument("--steps", type=int, default=3000, help="describing steps (0: untrained)")
    parser.add_argument("--check", action="store_true", help="only say if --out is up to date")
    a = parser.parse_args(argv)
    recorded = os.path.join(a.out, "recipe.json")
    if os.path.exists(a.out) and not os.path.isfile(recorded):  # never delete another folder
        parser.error(f"--out {a.out} exists and is not a folder this recipe built (no recipe.json)")
    if a.check:
        if not os.path.isfile(recorded):
            parser.error(
                f"--out {a.out} holds no model yet: build it with python build_tiny_llava.py"
            )
        with open(recorded) as f:
            built = json.load(f)
        now = recipe_key(built["steps"])
        print(f"{a.out}: built with key {built['key']}, the recipe's key is now {now}")
        sys.exit(0 if now == built["key"] else 1)
    t0, key = time.time(), recipe_key(a.steps)  # the code as it is now, before it runs
    parent = os.path.dirname(os.path.abspath(a.out))
    tmp = tempfile.mkdtemp(dir=parent, prefix=".building-")
    os.chmod(tmp, 0o755)  # a folder like any other (mkdtemp makes it private)
    print(f"building the tiny model ({a.steps} steps) in {tmp}, then moving it to {a.out}")
    try:
        readout = pretrain_tiny(build_tiny_model(tmp, TINY_PRETRAIN["seed"]), a.steps)
        write_card(tmp, key, a.steps, readout, time.time() - t0)
    except BaseException:
        shutil.rmtree(tmp)  # a failed or interrupted build leaves the old folder as it was
        raise
    shutil.rmtree(a.out, ignore_errors=True)  # the old folder goes only once the new one is whole
    os.replace(tmp, a.out)
    print(f"built {a.out} in {time.time() - t0:.0f} s: read-out {readout}")


if __name__ == "__main__":
    main()
