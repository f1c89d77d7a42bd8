"""plumbing.py: what a first reading of rl4vlm_min.py can skip.

rl4vlm_min.py (the algorithm) and envs.py (the games) call these through one-line hooks:
- the CLI's checks of its values, and every error message that tells the user what to do (a NaN
  loss, value or gradient included);
- the tiny model's pretraining (what a real VLM knows before any game), built once and cached;
- the critic input's standardization (value_input "mean"), fit once as RL starts;
- SFT's read-out check, and the random and oracle policies' success on the eval seeds;
- real checkpoints: the per-family bounds on image tokens and the checks of a loaded processor;
- torchrun data parallelism: starting the workers, averaged gradients, merged metrics, and a check
  that every worker holds the same weights after every update;
- exact resume: checkpoints written atomically (trainable weights, optimizer, every RNG, the envs'
  states, episodes so far) and restored, the run's own settings read back;
- one GPU: the memory estimate and --dry-run;
- the per-update log line, the learning-curve plot, the final model and the summary;
- the points games' formula search (their oracle); drawing the cards (Pillow only, its bundled
  font) and a contact sheet of frames.
"""

import ast
import contextlib
import copy
import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import textwrap
import time
from fractions import Fraction

import numpy as np
import torch
import torch.distributed as dist
import transformers
from PIL import Image, ImageDraw, ImageFont

# torchrun starts WORLD workers and tells each its RANK (without torchrun: 1 worker, rank 0)
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def fail(message):
    """Bad input: one line that says what to do, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_finite(name, tensor, where):
    """A NaN or inf loss, log-prob, value or gradient norm stops the run with what to do."""
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"{name} is NaN or inf at {where}: stopping, the last checkpoint is kept; continue "
            "from it with --resume OUTPUT_DIR and a lower --learning-rate or --max-grad-norm"
        )


def core():
    """rl4vlm_min itself (imported when first needed: it imports this module)."""
    import rl4vlm_min

    return rl4vlm_min


# ---- CLI: the checks of the values, and --resume's settings ----
def check_args(args):
    """Every value in range, or one line that says which flag to change (exit status 2)."""
    checks = [
        (args.learning_rate > 0 and args.sft_lr > 0, "learning rates must be > 0"),
        (args.clip_coef > 0, "--clip-coef must be > 0"),
        (args.update_epochs > 0, "--update-epochs must be > 0"),
        (
            min(args.num_envs, args.num_steps, args.micro_batch_size) > 0,
            "--num-envs, --num-steps and --micro-batch-size must be > 0",
        ),
        (
            0 < args.num_minibatches <= args.batch_size,
            f"--num-minibatches must be in 1..{args.batch_size} (the batch num_envs * num_steps)",
        ),
        (args.temperature > 0, "--temperature must be > 0"),
        (args.kl_coef >= 0, "--kl-coef must be >= 0"),
        (0 <= args.adam_beta2 < 1, "--adam-beta2 must be in [0, 1)"),
        (0 <= args.thought_coef <= 1, "--thought-coef must be in [0, 1]"),
        (0 <= args.sft_oracle_prob <= 1, "--sft-oracle-prob must be in [0, 1]"),
        (min(args.lora_rank, args.sft_steps) >= 0, "--lora-rank, --sft-steps must be >= 0"),
        (args.max_new_tokens > 0, "--max-new-tokens must be > 0"),
        (args.eval_episodes > 0, "--eval-episodes must be > 0"),
        (
            args.total_steps >= args.batch_size * WORLD,
            f"--total-steps must be at least one batch of all workers ({args.batch_size * WORLD})",
        ),
    ]
    for ok, message in checks:
        if not ok:
            fail(f"{message} (see python rl4vlm_min.py --help)")
    return args


RESUME_FIXED = ("task", "model", "num_envs", "num_steps", "lora_rank", "lora_targets")


def resumed_args(args, given):
    """--resume DIR: the run's own settings from its checkpoint. Flags typed now override them
    (e.g. a lower --learning-rate after a NaN), except those the saved state depends on."""
    meta_path = os.path.join(args.resume, "checkpoint", "meta.json")
    if not os.path.isfile(meta_path):
        fail(
            f"--resume {args.resume!r} holds no checkpoint ({meta_path} is missing); pass the "
            "--output-dir of a run that saved one (with --save-every K, or a finished run)"
        )
    with open(meta_path) as f:
        saved = json.load(f)["args"]
    for key in RESUME_FIXED:
        if key in given and getattr(args, key) != saved[key]:
            fail(
                f"--resume {args.resume!r} holds a checkpoint made with --{key.replace('_', '-')} "
                f"{saved[key]!r}, not {getattr(args, key)!r}; resume with the same value or start "
                "a new run in another --output-dir"
            )
    typed = {key: getattr(args, key) for key in given if key in saved and key != "output_dir"}
    return type(args)(**{**saved, **typed, "output_dir": args.resume, "resume": args.resume})


# ---- REAL CHECKPOINTS: a 300x300 frame as one bounded view, and what a processor must have ----
# The only family-specific code: from_pretrained overrides that keep a frame one view (the paper's
# single 336-px view is 576 tokens) instead of tiling it, each derived from the checkpoint's own
# configuration; and `mrope`: the model builds its own 3-D positions (no 1-D position ids).
TESTED_FAMILIES = (
    "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"
)  # fmt: skip


def family_bounds(config, name, trust_remote_code):
    """(processor kwargs, model kwargs, mrope) for the checkpoint `name` with this config."""
    kind = config.model_type
    if kind in ("llava_next", "llava_onevision"):  # any-resolution tiling: allow one tile of the
        side = config.vision_config.image_size  # tower's own size (base view + 1 tile, not 4-36)
        return (
            {"image_grid_pinpoints": [[side, side]]},
            {"image_grid_pinpoints": [[side, side]]},
            False,
        )
    if kind in ("qwen2_vl", "qwen2_5_vl"):  # never more pixels than the frame has
        processor = transformers.AutoImageProcessor.from_pretrained(
            name, trust_remote_code=trust_remote_code
        )
        pixels = FRAME * FRAME
        size = {
            "shortest_edge": min(processor.size["shortest_edge"], pixels),
            "longest_edge": pixels,
        }
        return {"size": size}, {}, True
    if kind in ("idefics3", "smolvlm"):  # one resized crop, not a grid of crops
        return {"do_image_splitting": False}, {}, False
    return {}, {}, False  # LLaVA-1.5 and others: one view as they are


@contextlib.contextmanager
def loading(name):
    """A checkpoint that is missing or not an image-text-to-text model: what to pass instead."""
    try:
        yield
    except (OSError, ValueError) as e:
        fail(
            f"cannot load --model {name!r} as an image-text-to-text model "
            f"({str(e).splitlines()[0][:200]}); pass 'tiny', a local checkpoint or a "
            "Hugging Face id"
        )


def check_checkpoint(name, config, processor, vlm):
    """Refuse a checkpoint that cannot take an image or has no chat template, with what to do;
    keep only the token ids of its generation_config (sampling_config sets everything else)."""
    if config.model_type not in TESTED_FAMILIES:
        print(f"note: model type {config.model_type!r} is not among the tested families; trying it")
    if getattr(processor, "image_processor", None) is None or not hasattr(processor, "tokenizer"):
        fail(f"--model {name!r} has a processor that cannot take an image; pass an "
             "image-text-to-text checkpoint")  # fmt: skip
    if getattr(processor, "chat_template", None) is None:
        fail(f"--model {name!r} has no chat template; use a chat/instruct checkpoint or add one to "
             "its processor")  # fmt: skip
    tok = processor.tokenizer
    vlm.generation_config = transformers.GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )


def readout_accuracy(policy, args, samples, prompts):
    """SFT's check: the share of greedy answers (eval mode, as when the model plays) whose
    thoughts read the state right, on held-out (frame, info, ids) samples."""
    policy.eval()
    frames = [frame for frame, _, _ in samples]
    answers = policy.generate(frames, prompts, True, args.max_new_tokens)
    texts = [policy.processor.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    hits = [core().thought_text(args.task, i) in t for (_, i, _), t in zip(samples, texts)]
    policy.train()
    return float(np.mean(hits))


def sft_check_set(policy, args):
    """SFT's 16 held-out states (not the batches it trains on), from their own generator, and
    their prompts."""
    import envs

    rl, rng = core(), np.random.default_rng(args.seed + 10**6)
    check = rl.sft_answers(args, envs.TASKS[args.task](), rng, 16, 0.0, policy.processor.tokenizer)
    return check, rl.task_prompts(policy.processor, args.task, [i for _, i, _ in check], args.cot)


def log_sft_step(policy, args, step, loss, check):
    """Every 50 SFT steps and at the last: the loss and the greedy read-out on the check set."""
    if step % 50 == 0 or step == args.sft_steps:
        readout = readout_accuracy(policy, args, *check)
        print(f"sft step {step:4d}/{args.sft_steps} | loss {loss:.3f} | "
              f"read-out (greedy) {readout:.2f}", flush=True)  # fmt: skip


def dropout_off(policy):
    """Every dropout to 0 (nn.Dropout and attention dropout): the rollout scores the old log-probs
    in eval mode, the update in train mode, and both must be the same function."""
    for m in policy.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def print_trainable(policy, args, phase, params):
    """What set_trainable chose: how many parameters train, and where the LoRA adapters are."""
    where = {}
    for name, module in policy.vlm.named_modules():
        if hasattr(module, "lora_A"):
            part = ".".join(n for n in name.split(".")[:2] if n != "model")
            where[part] = where.get(part, 0) + 1
    count = f"{phase.upper()} trains {sum(p.numel() for p in params):,} parameters"
    if phase == "rl":
        count += " (value head included)"
    if where:
        adapters = ", ".join(f"{n} in {part}" for part, n in where.items())
        count += (
            f": LoRA rank {args.lora_rank} adapters on {sum(where.values())} linear layers "
            f"({adapters}), the rest of the VLM frozen"
        )
    print(count if where else count + ": every weight of the VLM", flush=True)


# ---- THE MODEL: the tiny model's tokenizer, generate()'s settings ----
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
    import envs

    texts = ["USER: ASSISTANT: \n", " ".join(str(i) for i in range(40))]
    rng = np.random.default_rng(0)
    for task, cls in envs.TASKS.items():
        env = cls()
        texts.append(" ".join(cls.action_names))  # every action after a space, as in formulas
        for seed in range(100):
            _, info = env.reset(seed=seed)
            for _ in range(4):  # a few random moves: formulas and Blackjack totals of later steps
                for cot in (True, False):
                    texts.append(core().build_prompt(task, info, cls.action_names, cot))
                    texts += [core().answer_text(task, info, a, cot) for a in cls.action_names]
                _, _, term, trunc, info = env.step(int(rng.integers(len(cls.action_names))))
                if term or trunc:
                    break
    return "\n".join(texts)


# ---- THE TINY MODEL'S PRETRAINING: what a real VLM knows before any game, built once, cached ----
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
# The result is a standard checkpoint in a cache folder named by a hash of everything that
# determines it: rebuilt when any of that changes, or with --rebuild-tiny.
TINY_PRETRAIN = dict(seed=0, vision_steps=400, vision_batch=32, batch_size=16, lr=1e-3)


def cache_root():
    default = os.path.join(os.path.expanduser("~"), ".cache", "rl4vlm-min")
    return os.environ.get("RL4VLM_MIN_CACHE", default)


def code_text(obj):
    """The code of a module, class or function as Python reads it: its syntax tree without
    docstrings (comments and layout are not in the tree). Editing a comment, rewrapping a line or
    moving a function to another module leaves it the same; changing what the code does does not."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def tiny_model_key(steps):
    """A hash of what determines the pretrained tiny model: its settings and the code (code_text)
    that builds it, draws the frames and writes the prompts and read-outs."""
    import envs

    rl = core()
    code = [envs, solutions, card_places, card_table, card_image, draw_suit, numberline_frame,
            tiny_tokenizer, tiny_corpus, pretrain_tiny, pretrain_vision, patch_values,
            pretrain_describe, rl.build_tiny_model, rl.build_prompt, rl.chat_prompt,
            rl.thought_text, rl.answer_text, rl.sft_answers, rl.load_model]  # fmt: skip
    code += [rl.Policy.encode_prompts, rl.Policy.score, rl.Policy.hidden_states]
    text = json.dumps(
        [rl.TINY_VISION, TINY_TEMPLATE, TINY_SPLIT, TINY_PRETRAIN, rl.GAME_RULES, steps]
    )
    text += "".join(code_text(obj) for obj in code) + transformers.__version__
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def tiny_model(args):
    """The pretrained tiny model's folder: from the cache, or built there now (rank 0)."""
    path = os.path.join(cache_root(), f"tiny-{tiny_model_key(args.pretrain_steps)}")
    if RANK == 0 and (args.rebuild_tiny or not os.path.exists(os.path.join(path, "done"))):
        print(f"pretraining the tiny model ({args.pretrain_steps} steps) into {path}", flush=True)
        t0 = time.time()
        os.makedirs(cache_root(), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_root(), prefix="building-")
        with torch.random.fork_rng():  # the run's own random stream is the same, cached or not
            pretrain_tiny(core().build_tiny_model(tmp, TINY_PRETRAIN["seed"]), args.pretrain_steps)
        with open(os.path.join(tmp, "done"), "w") as f:
            f.write(f"{time.time() - t0:.0f} s\n")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)  # whole or not at all: an interrupted build leaves no half model
        print(f"pretrained the tiny model in {time.time() - t0:.0f} s", flush=True)
    else:
        print(f"tiny model: pretrained, from the cache {path} (--rebuild-tiny to rebuild)")
    barrier()  # torchrun: the others wait for it
    return path


def pretrain_tiny(path, steps):
    """The two stages, in place on the checkpoint at `path`; `steps` of describing (0: none).
    On one torch thread whatever the machine has: the thread count changes the order of the
    float sums, and that alone changed what this build learned (results/EXPERIMENTS.md §12)."""
    rl, threads = core(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        processor, vlm = rl.load_model(path, torch.device("cpu"), torch.float32)
        rng = np.random.default_rng(TINY_PRETRAIN["seed"])
        torch.manual_seed(TINY_PRETRAIN["seed"])
        if steps > 0:
            pretrain_vision(vlm, processor, rng)
            pretrain_describe(vlm, processor, rng, steps)
        vlm.save_pretrained(path)
    finally:
        torch.set_num_threads(threads)  # the run itself uses the threads it was given
    return path


def patch_values(env, grid):
    """The vision probe's targets for env's frame: (grid * grid,) card values by patch."""
    import envs

    rows, _, (w, h), *left = env.table()
    target = torch.zeros(grid * grid, dtype=torch.long)
    for x, y, label, _ in card_places(rows, (w, h), *left):  # the rank: at the card's centre
        value = envs.label_value(label) if label else 11
        row, col = ((y + h / 2 - 4) * grid // FRAME, (x + w / 2) * grid // FRAME)
        target[int(row) * grid + int(col)] = value
    return target


def pretrain_vision(vlm, processor, rng):
    """Stage 1: the tower and a linear probe on its image tokens learn each patch's card value."""
    import envs

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


def pretrain_describe(vlm, processor, rng, steps):
    """Stage 2: the whole VLM learns to answer every game (read-out right, action random), each
    batch mixing the four."""
    import types

    import envs

    rl, cfg = core(), TINY_PRETRAIN
    policy = rl.Policy(vlm, processor, 1.0, 1.0)
    tok = processor.tokenizer
    optimizer = torch.optim.Adam(vlm.parameters(), lr=cfg["lr"])
    games, checks = {}, {}
    for task, cls in envs.TASKS.items():  # 50 held-out states per game for the read-out check
        args = types.SimpleNamespace(task=task, cot=True, max_new_tokens=48)
        games[task] = args, cls()
        check = rl.sft_answers(args, cls(), np.random.default_rng(10**6), 50, 0.0, tok, True)
        checks[task] = check, rl.task_prompts(processor, task, [i for _, i, _ in check], True)
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
                read = {t: readout_accuracy(policy, games[t][0], *checks[t]) for t in games}
                line += " | read-out (greedy) " + ", ".join(f"{t} {v:.2f}" for t, v in read.items())
            print(line, flush=True)


def sampling_config(policy, greedy, max_new_tokens):
    """Every setting of generate(), explicit: plain sampling at the policy's temperature (or
    greedy),
    nothing score() does not apply: no top-k/p, min-p, typical-p or repetition penalty."""
    sampling = dict(
        do_sample=True, temperature=policy.temperature, top_k=0, top_p=1.0, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0,
    )  # fmt: skip
    return transformers.GenerationConfig(
        **(dict(do_sample=False) if greedy else sampling),
        repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, num_beams=1,
        max_new_tokens=max_new_tokens, suppress_tokens=policy.banned or None,
        pad_token_id=policy.pad_id, eos_token_id=policy.eos_id,
    )  # fmt: skip


# ---- THE CRITIC'S INPUT (value_input "mean"): standardized with statistics fixed as RL starts ----
class Standardize(torch.nn.Module):
    """x -> (x - mean) / std: the value head's first layer (fit_critic_input sets mean and std)."""

    def __init__(self, size):
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("std", torch.ones(size))

    def forward(self, x):
        return (x - self.mean) / self.std


def fit_critic_input(policy, args, n=256):
    """The tiny model's mean prompt features differ between states by about 5% of their size:
    a value head fit 0.06 of NumberLine's exact state values from them, 1.00 once each feature
    was standardized (results/EXPERIMENTS.md §8). So the head's first layer standardizes them
    with their mean and std over n states like SFT's, fixed for the run."""
    import envs

    rl, tok = core(), policy.processor.tokenizer
    rng = np.random.default_rng(args.seed + 7)
    data = rl.sft_answers(args, envs.TASKS[args.task](), rng, n, 0.0, tok, readout_only=True)
    prompts = rl.task_prompts(policy.processor, args.task, [info for _, info, _ in data], args.cot)
    parts = [slice(lo, lo + args.micro_batch_size) for lo in range(0, n, args.micro_batch_size)]
    frames = [frame for frame, _, _ in data]
    features = torch.cat([policy.features(frames[part], prompts[part]) for part in parts])  # (n, H)
    policy.value_head[0].mean.copy_(features.mean(0))
    policy.value_head[0].std.copy_(features.std(0).clamp(min=1e-4))
    broadcast_weights(policy)  # torchrun: every worker standardizes alike


# ---- DATA PARALLEL (torchrun): own envs and seeds per worker, averaged gradients ----
def device_and_dtype():
    """This worker's GPU in bf16 (where supported) if there is one, else the CPU in fp32."""
    if not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32


def print_setup(policy, args, device, dtype):
    n_params = sum(p.numel() for p in policy.parameters())
    prompt_tokens, image_tokens = prompt_shape(policy, args)
    print(
        f"task {args.task} | model {args.model} ({type(policy.vlm).__name__}, "
        f"{n_params / 1e6:.2f}M params) | {device} {dtype} | prompt {prompt_tokens} tokens "
        f"({image_tokens} image) | {args.num_updates} updates x {args.batch_size} steps x "
        f"{WORLD} worker(s)",
        flush=True,
    )


def start_workers(device):
    if WORLD > 1 and not dist.is_initialized():
        import datetime  # rank 0 evaluates alone while the others wait: allow a long wait

        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=3))
    if device.type == "cuda":
        torch.cuda.set_device(device)


def stop_workers():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if WORLD > 1:
        dist.barrier()


def average_gradients(params):
    """After each worker's backward: every worker holds the mean of all workers' gradients, so all
    take the same optimizer step and the weights stay identical (as DistributedDataParallel)."""
    if WORLD == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)  # sum over workers
        p.grad /= WORLD


def broadcast_weights(module):
    """New layers were initialised on each worker: all start from rank 0's values."""
    if WORLD > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def gather(obj):
    """[obj of worker 0, obj of worker 1, ...] on every worker ([obj] without torchrun)."""
    if WORLD == 1:
        return [obj]
    out = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


def update_row(args, update, lr, episodes, data, stats, t_update):
    """One update's metrics over all workers: success and return of their last 100 episodes each,
    the mean of each worker's rates and losses."""
    recent = [episode for worker in gather(episodes[-100:]) for episode in worker]
    mine = dict(
        format_error_rate=data["format_error_rate"], readout_acc=data["readout_acc"], **stats
    )
    merged = {key: float(np.mean([worker[key] for worker in gather(mine)])) for key in mine}
    nan = float("nan")
    return dict(
        update=update, env_steps=update * args.batch_size * WORLD, lr=lr,
        episodes=sum(gather(len(episodes))),
        success=float(np.mean([r > 0 for r, _ in recent])) if recent else nan,
        mean_return=float(np.mean([r for r, _ in recent])) if recent else nan,
        **merged, steps_per_second=args.batch_size * WORLD / (time.time() - t_update),
        samples=data["gallery"],
    )  # fmt: skip


def trainable_state(policy):
    """What RL changes: the trainable weights, and the critic input's fixed statistics."""
    state = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    state |= {f"value_head.{n}": b for n, b in policy.value_head.named_buffers()}
    return {n: t.detach().contiguous().cpu() for n, t in state.items()}


def weights_digest(policy):
    tensors = trainable_state(policy).values()
    return hashlib.sha1(b"".join(t.numpy().tobytes() for t in tensors)).hexdigest()


def check_weights_agree(policy, row):
    """torchrun: the point of averaging gradients, checked after every update."""
    if WORLD > 1:
        row["weight_digests"] = gather(weights_digest(policy))
        if len(set(row["weight_digests"])) != 1:
            raise RuntimeError(f"the workers' weights differ after update {row['update']}")


# ---- EXACT RESUME: checkpoints written to a temp dir then renamed; every RNG and env state ----
def make_output_dir(args):
    """Rank 0 creates --output-dir and starts metrics.jsonl (appends to it on --resume)."""
    if RANK > 0:
        return
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a" if args.resume else "w"):
            pass
    except OSError as e:
        fail(f"cannot write --output-dir {args.output_dir!r} ({e.strerror}); choose a writable one")


def resumed_model(args):
    """A resumed run's SFT model (the frozen LoRA base or the KL reference), if it saved one."""
    path = os.path.join(args.output_dir, "sft_model")
    return path if args.resume and os.path.isdir(path) else None


def keep_sft_model(policy, args):
    """After SFT: RL freezes these weights (LoRA after SFT) or keeps them as the KL reference;
    --resume needs them."""
    if (args.lora_rank > 0 or args.kl_coef > 0) and not args.lora_in_sft and RANK == 0:
        policy.vlm.save_pretrained(os.path.join(args.output_dir, "sft_model"))
        policy.processor.save_pretrained(os.path.join(args.output_dir, "sft_model"))


def env_state(env):
    """The game and its random generator as plain data: set_env_state continues it exactly."""
    game = copy.deepcopy({key: getattr(env, key) for key in env.state_fields})
    return {"game": game, "rng": env.np_random.bit_generator.state}


def set_env_state(env, state):
    for key, value in copy.deepcopy(state["game"]).items():
        setattr(env, key, value)
    env.np_random.bit_generator.state = state["rng"]


def save_checkpoint(policy, optimizer, vec, args, rng, generator, episodes, update):
    """Every worker's RNGs and envs, gathered; rank 0 writes them with the weights and optimizer."""
    mine = {
        "torch_rng": torch.get_rng_state(), "generator": generator.get_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_rng": rng.bit_generator.state, "python_rng": random.getstate(),
        "envs": [env_state(env) for env in vec["envs"]], "ep_return": vec["ep_return"],
        "ep_len": vec["ep_len"], "episodes": episodes,
    }  # fmt: skip
    workers = gather(mine)
    if RANK == 0:
        state = {"optimizer": optimizer.state_dict(), "workers": workers}
        meta = dict(update=update, workers=WORLD, args=dataclasses.asdict(args))
        write_checkpoint(policy, state, meta, args.output_dir)


def write_checkpoint(policy, state, meta, output_dir):
    """Write everything to a fresh temp dir, then swap it in with renames: a crash at any point
    leaves the previous checkpoint whole (checkpoint/, or between the renames checkpoint.old/)."""
    from safetensors.torch import save_file

    final = os.path.join(output_dir, "checkpoint")
    tmp = tempfile.mkdtemp(prefix=".checkpoint-", dir=output_dir)
    try:
        save_file(trainable_state(policy), os.path.join(tmp, "policy.safetensors"))
        if policy.reference is not None:  # the KL reference's adapters, if any
            adapters = {
                n: p.contiguous().cpu()
                for n, p in policy.reference.named_parameters()
                if ".lora_" in n
            }
            save_file(adapters, os.path.join(tmp, "reference.safetensors"))
        torch.save(state, os.path.join(tmp, "state.pt"))  # plain data: loaded with weights_only
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    except BaseException:
        shutil.rmtree(tmp)  # a half-written temp dir is removed; the old checkpoint is untouched
        raise
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    if os.path.exists(final + ".old"):
        shutil.rmtree(final + ".old")


def restore_checkpoint(policy, optimizer, vec, args, rng, generator):
    """--resume: put back what save_checkpoint wrote. Returns (next update, episodes, metrics)."""
    from safetensors.torch import load_file

    ckpt = os.path.join(args.output_dir, "checkpoint")
    weights = load_file(os.path.join(ckpt, "policy.safetensors"))
    if set(weights) != set(trainable_state(policy)):
        fail(f"the checkpoint in {ckpt} does not match this model's trainable parameters; "
             "start a new run")  # fmt: skip
    policy.load_state_dict(weights, strict=False)
    if policy.reference is not None:
        reference = load_file(os.path.join(ckpt, "reference.safetensors"))
        policy.reference.load_state_dict(reference, strict=False)
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)  # never unpickles code
    if len(state["workers"]) != WORLD:
        n = len(state["workers"])
        fail(f"the checkpoint in {ckpt} was written by {n} worker(s), this run has {WORLD}; "
             f"resume with torchrun --nproc_per_node {n} (or without torchrun if 1)")  # fmt: skip
    optimizer.load_state_dict(state["optimizer"])
    state = state["workers"][RANK]
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    generator.set_state(state["generator"])
    rng.bit_generator.state = state["numpy_rng"]
    random.setstate(state["python_rng"])
    for env, saved in zip(vec["envs"], state["envs"]):
        set_env_state(env, saved)
    vec["obs"], vec["infos"] = (list(x) for x in zip(*(env.obs() for env in vec["envs"])))
    vec["ep_return"], vec["ep_len"] = list(state["ep_return"]), list(state["ep_len"])
    with open(os.path.join(ckpt, "meta.json")) as f:
        done = json.load(f)["update"]
    history, metrics = [], os.path.join(args.output_dir, "metrics.jsonl")
    if RANK == 0:  # rank 0 alone keeps the metrics; rows after the checkpoint are redone
        with open(metrics) as f:
            history = [json.loads(line) for line in f][:done]
        with open(metrics, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in history)
    print(f"resumed {args.output_dir} after update {done}/{args.num_updates}", flush=True)
    return done + 1, list(state["episodes"]), history


# ---- THE RUN'S OUTPUTS: the per-update line, the curve, the final model, the summary ----
def log_update(args, row, example):
    """metrics.jsonl gets the row; the console gets one line of it and one sampled answer."""
    if RANK == 0:
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    print(
        f"update {row['update']:3d}/{args.num_updates} | steps {row['env_steps']:6d} | "
        f"success {row['success']:.2f} | return {row['mean_return']:+.2f} | "
        f"fmt_err {row['format_error_rate']:.2f} | read {row['readout_acc']:.2f} | "
        f"pg {row['pg_loss']:+.3f} | v {row['v_loss']:.3f} | kl {row['approx_kl']:.4f} | "
        f"kl_ref {row['kl_ref']:.4f} | clip {row['clipfrac']:.2f} | "
        f"ev {row['explained_var']:+.2f} | {row['steps_per_second']:.0f} steps/s"
        + (f" | {WORLD} workers" if WORLD > 1 else ""),
        flush=True,
    )
    print(f"    e.g. {example['answer']!r} -> {example['action']}", flush=True)


def merge_lora(vlm):
    for name, module in list(vlm.named_modules()):
        if hasattr(module, "lora_A"):  # a LoRALinear: B A folded into the base layer's weight
            base = module.base
            with torch.no_grad():
                delta = module.scale * module.lora_B @ module.lora_A
                base.weight += delta.to(base.weight.dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(vlm.get_submodule(parent_name), child, base)


def save_final_model(policy, path):
    """LoRA merged into the weights, saved as a plain checkpoint (--model path) + the value head."""
    from safetensors.torch import save_file

    merge_lora(policy.vlm)
    policy.vlm.save_pretrained(path)
    policy.processor.save_pretrained(path)
    head = {k: v.contiguous() for k, v in policy.value_head.state_dict().items()}
    save_file(head, os.path.join(path, "value_head.safetensors"))


def plot_curve(history, path, title, levels):
    """Success over env steps with the SFT-only, random and oracle levels (`levels`: name ->
    success), and beside it format errors, read-out, approx_kl, kl_ref and explained variance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["env_steps"] for h in history]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    success = [h["success"] for h in history]
    ax.plot(steps, success, marker="o", ms=3, label="success (last 100 episodes)")
    for (name, level), style in zip(levels.items(), (":", "--", "-.")):
        ax.axhline(level, color="gray", ls=style, lw=1, label=f"{name} {level:.2f}")
    ax.set(xlabel="env steps", ylabel="success", title=title, ylim=(-0.02, 1.02))
    for key in ("format_error_rate", "readout_acc", "approx_kl", "kl_ref", "explained_var"):
        if key in history[0]:
            ax2.plot(steps, [h[key] for h in history], marker=".", label=key)
    ax2.set(xlabel="env steps", title="diagnostics", ylim=(-0.5, 1.05))
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finish_run(policy, args, history, before, after, baselines, t0):
    """After the last evaluation: the curve, the final model, summary.json."""
    levels = {"SFT only (sampled)": before["sampled"]["success"], **baselines}
    curve = os.path.join(args.output_dir, "learning_curve.png")
    plot_curve(history, curve, f"{args.task}: PPO after SFT", levels)
    save_final_model(policy, os.path.join(args.output_dir, "final_model"))
    prompt_tokens, image_tokens = prompt_shape(policy, args)
    summary = dict(
        task=args.task, model=args.model, seed=args.seed, prompt_tokens=prompt_tokens,
        image_tokens=image_tokens, eval_success_before_rl=before["sampled"]["success"],
        eval_success_after_rl=after["sampled"]["success"],
        eval_greedy_success_before_rl=before["greedy"]["success"],
        eval_greedy_success_after_rl=after["greedy"]["success"],
        random_success=baselines["random"], oracle_success=baselines["oracle"],
        env_steps=args.num_updates * args.batch_size * WORLD, wall_seconds=time.time() - t0,
        before=before, after=after,
    )  # fmt: skip
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_table(args, before, after, baselines)
    print(f"{summary['env_steps']} env steps in {summary['wall_seconds']:.0f} s; outputs in "
          f"{args.output_dir}/")  # fmt: skip
    return summary


def saved_before(args):
    with open(os.path.join(args.output_dir, "before_rl.json")) as f:
        return json.load(f)


def save_before(args, before):
    if RANK == 0:
        with open(os.path.join(args.output_dir, "before_rl.json"), "w") as f:
            json.dump(before, f)


def baseline_success(args):
    """Success of the random and the oracle policy on the run's eval seeds."""
    import envs

    out = {}
    for kind in ("random", "oracle"):
        rng, wins = np.random.default_rng(args.seed), 0
        for seed in range(core().EVAL_SEED, core().EVAL_SEED + args.eval_episodes):
            env = envs.TASKS[args.task]()
            env.reset(seed=seed)
            total, done = 0.0, False
            while not done:
                n = env.action_space.n
                action = env.oracle() if kind == "oracle" else int(rng.integers(n))
                _, reward, terminated, truncated, _ = env.step(action)
                total, done = total + reward, terminated or truncated
            wins += total > 0
        out[kind] = wins / args.eval_episodes
    return out


def print_before(before, baselines):
    if RANK == 0:
        print(
            f"before RL: success {before['sampled']['success']:.2f} sampled, "
            f"{before['greedy']['success']:.2f} greedy | read-out "
            f"{before['sampled']['readout_acc']:.2f} | random {baselines['random']:.2f} | "
            f"oracle {baselines['oracle']:.2f}",
            flush=True,
        )


def print_table(args, before, after, baselines):
    """The run's result: success before and after RL beside the random and oracle policies."""
    print(
        f"\n{f'eval success ({args.eval_episodes} episodes)':34s} "
        f"{'before RL':>10s} {'after RL':>10s}"
    )
    for mode in ("sampled", "greedy"):
        label = f"  sampled (T={args.temperature})" if mode == "sampled" else "  greedy"
        print(f"{label:34s} {before[mode]['success']:10.2f} {after[mode]['success']:10.2f}")
    read = before["sampled"]["readout_acc"], after["sampled"]["readout_acc"]
    print(f"{'  read-out accuracy (sampled)':34s} {read[0]:10.2f} {read[1]:10.2f}")
    print(
        f"{'  random policy / oracle':34s} {baselines['random']:10.2f} {baselines['oracle']:10.2f}"
    )
    # p over n episodes has a standard error sqrt(p (1 - p) / n), at most 0.5 / sqrt(n)
    n = args.eval_episodes
    print(f"  (over {n} episodes a success rate's standard error is up to {0.5 / n**0.5:.3f})")


def prompt_shape(policy, args):
    """(prompt tokens, image tokens) of the task's first prompt: the longest part of a sequence."""
    obs, info = core().envs.TASKS[args.task]().reset(seed=0)
    prompts = core().task_prompts(policy.processor, args.task, [info], args.cot)
    ids = policy.encode_prompts([obs], prompts)["input_ids"][0]
    return len(ids), int((ids == policy.vlm.config.image_token_id).sum())


# ---- ONE GPU: will training fit, and --dry-run ----
def memory_estimate(policy, args, batch):
    """Rough training memory in bytes for `batch` sequences per forward/backward. Weights as
    loaded; gradients and Adam's two moments of the trainable parameters; activations of the
    language model after Korthikanti et al. 2022 (about 34 bytes per token per hidden unit per
    layer in 16-bit, or 2 with gradient checkpointing plus one layer recomputed), and of the
    vision tower if it trains (its tokens counted as the image tokens); the fp32 logits of the
    answer tokens; the rollout's KV cache."""
    text = policy.vlm.config.get_text_config()
    vision = getattr(policy.vlm.config, "vision_config", None)
    elem = next(policy.vlm.parameters()).element_size()  # 2 in bf16, 4 in fp32
    trainable = sum(p.numel() * p.element_size() for p in policy.parameters() if p.requires_grad)
    prompt_tokens, image_tokens = prompt_shape(policy, args)
    seq, h, layers = prompt_tokens + args.max_new_tokens, text.hidden_size, text.num_hidden_layers

    def kept(n):  # layers' worth of activations kept for the backward pass
        return 1 + (n - 1) * 2 / 34 if args.gradient_checkpointing else n

    activations = batch * 34 * seq * h * elem / 2 * kept(layers)
    tower_trains = any(p.requires_grad for n, p in policy.vlm.named_parameters() if "vision" in n)
    if vision is not None and tower_trains:
        h_v = getattr(vision, "embed_dim", None) or vision.hidden_size
        depth = getattr(vision, "num_hidden_layers", None) or vision.depth
        activations += batch * 34 * image_tokens * h_v * elem / 2 * kept(depth)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    est = {
        "weights": sum(p.numel() * p.element_size() for p in policy.parameters()),
        "gradients": trainable,
        "adam state": 2 * trainable,
        "activations": activations,
        "logits (fp32)": 3 * batch * args.max_new_tokens * text.vocab_size * 4,
        "KV cache (rollout)": args.num_envs * seq * layers * 2 * kv_heads * head_dim * elem,
    }
    return {k: int(v) for k, v in est.items()}


def print_memory(policy, args, phase):
    """The estimate for one micro-batch of SFT or RL, and whether this GPU holds it."""
    sft = phase == "SFT"
    est = memory_estimate(policy, args, min(args.micro_batch_size, args.sft_batch_size) if sft
                          else args.micro_batch_size)  # fmt: skip
    total_bytes = sum(est.values())

    def size(n):
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    parts = ", ".join(f"{k} {size(v)}" for k, v in est.items())
    line = f"memory estimate for {phase}: {parts} | total {size(total_bytes)}"
    if torch.cuda.is_available():
        free, capacity = torch.cuda.mem_get_info()
        fits = "fits" if total_bytes < free else (
            "may not fit: lower --micro-batch-size or --num-envs, or add --gradient-checkpointing "
            "/ --lora-in-sft"
        )  # fmt: skip
        line += f" | this GPU: {capacity / 2**30:.1f} GiB, {free / 2**30:.1f} free: {fits}"
    print(line, flush=True)
    return est


def dry_run(policy, args, rng, generator):
    """One rollout step of N envs and one PPO minibatch: measured time and peak memory."""
    import resource

    R = core()
    args = dataclasses.replace(
        args, num_steps=1, update_epochs=1, total_steps=args.num_envs, num_minibatches=1,
        micro_batch_size=math.gcd(args.micro_batch_size, args.num_envs),
    )  # fmt: skip
    optimizer = R.start_rl(policy, args)
    print_memory(policy, args, "RL")
    vec = R.new_envs(args, list(range(args.num_envs)))
    t0 = time.time()
    data = R.rollout(policy, vec, args, rng, [], update=1)
    t1 = time.time()
    advantages, returns = R.compute_gae(
        data["rewards"], data["values"], data["dones"], data["next_value"], args.gamma,
        args.gae_lambda,
    )  # fmt: skip
    stats = R.ppo_update(policy, optimizer, data, advantages, returns, args, generator, update=1)
    t2 = time.time()
    cuda = torch.cuda.is_available()  # Linux reports the RSS in KiB
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(
        resource.RUSAGE_SELF
    ).ru_maxrss * 1024  # fmt: skip
    print(
        f"dry run: rollout step of {args.num_envs} envs {t1 - t0:.2f} s | PPO update of "
        f"{args.num_envs} samples {t2 - t1:.2f} s | peak memory {peak / 2**30:.2f} GiB "
        f"({'GPU' if cuda else 'process RSS'}) | first ratio - 1 = {stats['first_ratio_dev']:.1e}",
        flush=True,
    )
    return dict(rollout_seconds=t1 - t0, update_seconds=t2 - t1, peak_bytes=peak, **stats)


# ---- THE POINTS GAMES' ORACLE: every formula that makes the target, for envs.PointsEnv.plan ----
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


@functools.cache
def solutions(values, target, ops):
    """Every formula (token tuple, fewest brackets) using each of `values` once that equals
    `target`, shortest first."""

    def build(items):  # items: tuple of (tokens, value, precedence); yields full expressions
        if len(items) == 1:
            yield items[0]
            return
        for i, j in itertools.permutations(range(len(items)), 2):
            (a, va, pa), (b, vb, pb) = items[i], items[j]
            rest = tuple(x for k, x in enumerate(items) if k not in (i, j))
            for op in ops:
                if op == "/" and vb == 0:
                    continue
                p = PRECEDENCE[op]
                left = ("(", *a, ")") if pa < p else a
                right = ("(", *b, ")") if pb < p or (pb == p and op in "-/") else b
                value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else 0}[op]
                yield from build(rest + ((left + (op,) + right, value, p),))

    found = {
        tokens
        for tokens, value, _ in build(tuple(((str(v),), Fraction(v), 3) for v in values))
        if value == target
    }
    return sorted(found, key=lambda t: (len(t), t))


# ---- DRAWING THE CARDS: each card drawn once (cached); frames paste cached cards ----
FRAME = 300  # frames are FRAME x FRAME x 3 uint8, as in the original package
TABLE = (0x35, 0x65, 0x4D)  # the card games' dark green table


@functools.cache
def font(size):  # Pillow's bundled scalable font: no font file needed
    return ImageFont.load_default(size=size)


def draw_suit(d, suit, cx, cy, r, color):
    """A suit symbol centred at (cx, cy) with half-size r, from circles and polygons."""

    def circle(x, y, radius):  # (x, y) and radius in units of r
        box = [cx + (x - radius) * r, cy + (y - radius) * r, cx + (x + radius) * r]
        d.ellipse(box + [cy + (y + radius) * r], fill=color)

    if suit == "D":
        d.polygon(
            [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=color
        )
        return
    if suit == "C":
        for x, y in ((0, -0.45), (-0.5, 0.15), (0.5, 0.15)):
            circle(x, y, 0.45)
    else:  # a heart, or a spade (an upside-down heart)
        s = 1 if suit == "H" else -1
        circle(-0.45, -s * 0.3, 0.5)
        circle(0.45, -s * 0.3, 0.5)
        top = cy - s * 0.15 * r
        d.polygon([(cx - 0.95 * r, top), (cx + 0.95 * r, top), (cx, cy + s * r)], fill=color)
    if suit in "SC":  # the stem of a spade or a club
        d.polygon([(cx, cy), (cx - 0.35 * r, cy + r), (cx + 0.35 * r, cy + r)], fill=color)


@functools.cache
def card_image(label, suit, w=64, h=92):
    """One card: a big rank in the middle (legible when the frame is shrunk), suits in two
    corners. label "" = face down (the dealer's hidden card)."""
    img = Image.new("RGB", (w, h), TABLE)
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([0, 0, w - 1, h - 1], radius=6, fill="white", outline="black", width=2)
    if not label:
        d.rounded_rectangle([5, 5, w - 6, h - 6], radius=4, fill=(150, 30, 40))
        return img
    color = (200, 0, 0) if suit in "HD" else (0, 0, 0)
    d.text((w / 2, h / 2 - 4), label, font=font(round(0.37 * h)), fill=color, anchor="mm")
    draw_suit(d, suit, 11, 12, 6, color)
    draw_suit(d, suit, w - 12, h - 13, 6, color)
    return img


def card_places(rows, size=(64, 92), left=None):
    """Where card_table puts each card of rows [(y, [(label, suit), ...]), ...]: (x, y, label,
    suit) of its top-left corner; each row centred, or from x = left (cards overlap if many)."""
    w = size[0]
    for y, cards in rows:
        step = min(w + 8, (FRAME - 20 - w) / max(len(cards) - 1, 1))
        x0 = (FRAME - w - step * (len(cards) - 1)) / 2 if left is None else left
        for i, (label, suit) in enumerate(cards):
            yield round(x0 + i * step), y, label, suit


def card_table(rows, texts=(), size=(64, 92), left=None):
    """A green table with rows of cards of `size` (card_places) and lines of white text
    [(y, text, font size), ...]."""
    img = Image.new("RGB", (FRAME, FRAME), TABLE)
    for x, y, label, suit in card_places(rows, size, left):
        img.paste(card_image(label, suit, *size), (x, y))
    for y, text, font_size in texts:
        d = ImageDraw.Draw(img)
        d.text((FRAME / 2, y), text, font=font(font_size), fill="white", anchor="mm")
    return img


@functools.cache
def numberline_frame(target, current):  # only 30 possible frames: draw each once
    img = Image.new("RGB", (FRAME, FRAME), "white")
    d = ImageDraw.Draw(img)
    d.text((FRAME / 2, 90), f"Target: {target}", font=font(48), fill="black", anchor="mm")
    d.text((FRAME / 2, 210), f"Current: {current}", font=font(48), fill="black", anchor="mm")
    return img


def contact_sheet(tasks, path="envs_contact_sheet.png"):
    """Three frames of each env along the oracle's moves, with the legal actions."""
    sheet = Image.new("RGB", (3 * FRAME, 4 * (FRAME + 40)), "white")
    for row, cls in enumerate(tasks.values()):
        env = cls()
        obs, _ = env.reset(seed=row)
        for col in range(3):
            sheet.paste(Image.fromarray(obs), (col * FRAME, row * (FRAME + 40) + 40))
            obs, _, term, trunc, _ = env.step(env.oracle())
            if term or trunc:
                obs, _ = env.reset()
        title = f"{cls.__name__}: actions {' '.join(cls.action_names)}"
        ImageDraw.Draw(sheet).text((8, row * (FRAME + 40) + 8), title, font=font(20), fill="black")
    sheet.save(path)
    print(f"wrote {path}")
