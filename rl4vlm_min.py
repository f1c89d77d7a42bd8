"""rl4vlm-min: fine-tune a vision-language model as a decision-making agent with PPO (RL4VLM).

Zhai et al., "Fine-Tuning Large Vision-Language Models as Decision-Making Agents via Reinforcement
Learning" (NeurIPS 2024). At every step the VLM sees the env's frame and a task prompt, writes a
chain of thought and then the action as text ({"thoughts": ..., "action": ...}); a parser maps the
text to a legal action; the env returns a reward. The action's log-probability is
    log pi(a|s) = lambda * sum log p(thought tokens) + sum log p(action tokens)   (paper, eq. 4.2)
and PPO with GAE trains the VLM and a value head on the per-step rewards, after a supervised warm
start (SFT) on answers whose thoughts read the state right, as in the paper.

    python rl4vlm_min.py --task numberline               # CPU, an embedded tiny LLaVA, minutes
    python rl4vlm_min.py --model llava-hf/llava-v1.6-mistral-7b-hf --preset paper --lora-in-sft
    python rl4vlm_min.py --resume runs/numberline-seed1  # continue a stopped run exactly
    torchrun --nproc_per_node K rl4vlm_min.py ...        # data-parallel on K GPUs or processes

This file is the lecture: config, prompts, parser, model, rollout, GAE, PPO, SFT, evaluation,
train(); envs.py holds the games. What a first reading skips is called through one-line hooks and
never imports this file: checks.py (bad input, NaNs, what a real checkpoint needs), parallel.py
(torchrun), checkpoints.py (--output-dir, --resume, the final model), report.py (log line, plot,
table, baselines, memory estimate, --dry-run). build_tiny_llava.py made the tiny model's folder.

Shapes: N envs, S steps per env per update, B batch (samples), P prompt tokens, A answer tokens,
T = P + A, V vocabulary, H hidden size.

Deviations from the paper, each on purpose (the runs behind them: results/EXPERIMENTS.md).
--preset paper sets the paper's (SFT of every weight at lr 2e-5, then LoRA 128 on every linear
layer in RL, clip 0.1, one grad-norm clip 0.01, advantages normalised per rollout...); these stay:
- SFT answers are drawn fresh, written from the env's oracle (the paper's SFT set is not in this
  repo): "one epoch" is --sft-steps x --sft-batch-size answers, each seen once.
- NumberLine's and Blackjack's thoughts end with a plan (the target's side, as its prompt asks;
  "a hit can/cannot bust"); EZPoints' read the state only, as the paper's do (see --thoughts).
- RL runs with dropout off (the official code sampled with it on), so the rollout and the update
  score with one function and the first minibatch's ratio is 1 (to float rounding; tested).
- Truncation (NumberLine's 10 moves, the points games' formula cap) is a loss under these games'
  rules, so it ends the episode like a termination: nothing bootstraps.
- Trained bf16 weights keep fp32 copies (parallel.Adam); the lr decays toward 0, not 1e-9.
- The official code's defects are not repeated: the thought/action split comes from character
  offsets (not token ids), each sample is re-scored with its own prompt, and evaluation exists.
Without the preset, for the tiny model (tiny-llava/: 0.5M parameters, word-level tokenizer, image
after the text; its recipe taught it to read the games' frames and answer in their JSON format, at
random, as a 7B LLaVA's pretraining would): lr 1e-4 or 3e-4, clip 0.2, 16 envs x 8 steps, all
weights train, 2 PPO epochs in NumberLine (others 4); SFT acts at random (not Points24; EZPoints:
well-formed moves); the value head reads the prompt's mean hidden state, detached, standardized; a
KL penalty toward the SFT policy (--kl-coef 0.5, exact over the vocabulary) and Adam's beta2 0.99
make bursts of broken answers rarer; the VLM's and the value head's gradients are each clipped to
norm 0.5; advantages are normalised per minibatch; Points24 is undiscounted (gamma 1).
"""

import copy
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor

import checkpoints
import checks
import envs
import parallel
import report
from parallel import RANK, WORLD  # this worker's index, the workers' count (0, 1: no torchrun)

transformers.utils.logging.disable_progress_bar()  # no load/save progress bars for a 1 MB model


# ---- CONFIG ----
def arg(default, help):
    """A config field and its --help line."""
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    task: Literal["numberline", "ezpoints", "points24", "blackjack"] = arg(
        "numberline", "which card env to learn; sets that game's row of GAME_DEFAULTS first"
    )
    model: str = arg("tiny", "'tiny' (the embedded LLaVA, tiny-llava/), a Hugging Face id or path")
    preset: Literal["tiny", "paper"] = arg("tiny", "'paper': the paper's settings, then your flags")
    seed: int = arg(1, "seeds torch, numpy, python, the envs, sampling and the SFT data")
    output_dir: str = arg("", "metrics, checkpoints and plots (default runs/<task>-seed<seed>)")
    # rollout
    num_envs: int = arg(16, "N: envs stepped together with one batched generate")
    num_steps: int = arg(8, "S: steps per env per PPO update (batch = N * S)")
    total_steps: int = arg(3072, "env steps of RL in total")
    temperature: float = arg(0.2, "sampling temperature; scoring divides the logits by it too")
    max_new_tokens: int = arg(48, "longest answer the model may write")
    cot: bool = arg(True, "thoughts before the action (--no-cot: the action only)")
    thoughts: Literal["plan", "state"] = arg("plan", "plan: state + a plan; state: the state only")
    thought_coef: float = arg(0.5, "lambda: weight of the thought tokens' log-prob (actions: 1)")
    # PPO and GAE
    learning_rate: float = arg(1e-4, "Adam learning rate of RL, cosine-decayed toward 0")
    gamma: float = arg(0.9, "discount factor")
    gae_lambda: float = arg(0.95, "GAE lambda")
    update_epochs: int = arg(4, "passes over the rollout batch per update (per game)")
    num_minibatches: int = arg(4, "optimizer steps per epoch: the batch split into this many")
    micro_batch_size: int = arg(32, "samples per forward/backward (gradient accumulation)")
    clip_coef: float = arg(0.2, "PPO clip range of the ratio")
    vf_clip: float = arg(0.2, "V clipped to within this of its rollout value (0: no clip)")
    adv_norm: Literal["minibatch", "rollout"] = arg(
        "minibatch", "normalise the advantages per minibatch, or once per rollout (the paper)"
    )
    ent_coef: float = arg(0.0, "entropy bonus (mean per answer token)")
    kl_coef: float = arg(0.5, "KL(policy || SFT policy) per answer token (0: off, the paper)")
    vf_coef: float = arg(0.5, "value-loss coefficient")
    max_grad_norm: float = arg(0.5, "gradient-norm clip of the VLM's and the value head's")
    grad_clip: Literal["apart", "joint"] = arg("apart", "clip the two gradients apart or as one")
    adam_beta2: float = arg(0.99, "Adam's second-moment decay in RL (torch and the paper: 0.999)")
    # model
    value_input: Literal["mean", "last"] = arg("mean", "critic input: prompt mean or last token")
    lora_rank: int = arg(0, "LoRA rank of the RL phase; 0 = RL trains every weight")
    lora_alpha: float = arg(64.0, "LoRA scale is alpha / rank")
    lora_dropout: float = arg(0.0, "dropout on the LoRA input, in SFT only")
    lora_targets: Literal["language", "all-linear"] = arg(
        "language", "LoRA on the LM's projections, or on every linear layer (the paper)"
    )
    lora_in_sft: bool = arg(False, "add LoRA before SFT, so SFT trains the adapters only")
    gradient_checkpointing: bool = arg(False, "recompute activations: less memory, more compute")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "auto", "the VLM's dtype; auto: bf16 on a GPU that has it, else fp32 (trained: fp32 copies)"
    )
    # SFT warm start
    sft_steps: int = arg(500, "supervised warm-start steps before RL (0 = none; per game)")
    sft_batch_size: int = arg(16, "answers per SFT step")
    sft_lr: float = arg(1e-3, "Adam learning rate of SFT")
    sft_readout_steps: int = arg(0, "first SFT steps on the thoughts alone (-1: half of SFT)")
    sft_oracle_prob: float = arg(0.0, "chance an SFT answer acts as the oracle (per game)")
    # evaluation and output
    eval_episodes: int = arg(200, "episodes per evaluation (per game); seeds unlike training")
    save_every: int = arg(0, "checkpoint every K updates (0 = only at the end)")
    resume: str = arg("", "continue the run in this --output-dir from its last checkpoint")
    trust_remote_code: bool = arg(False, "let a checkpoint run its own code (if you trust it)")
    dry_run: bool = arg(False, "print the memory estimate, time one step and one update, exit")

    def __post_init__(self):  # derived sizes, computed once, right here
        self.output_dir = self.output_dir or f"runs/{self.task}-seed{self.seed}"
        readout = self.sft_readout_steps  # -1: half of SFT's steps, whatever sets --sft-steps
        self.sft_readout = self.sft_steps // 2 if readout < 0 else readout
        self.batch_size = self.num_envs * self.num_steps  # B
        # --total-steps counts env steps over all workers (bad sizes are reported in parse_args)
        self.num_updates = max(self.total_steps // max(self.batch_size * WORLD, 1), 1)


# Each game's tuned settings, set before the flags you type (which win). Why each, with its runs:
# README.md, "Each game's defaults" (e.g. Points24 is undiscounted: at 0.9 RL stalled in formulas).
GAME_DEFAULTS = {
    "numberline": dict(sft_oracle_prob=0.0, learning_rate=3e-4, sft_steps=100, update_epochs=2),
    "ezpoints": dict(sft_oracle_prob=0.0, sft_lr=3e-4, thoughts="state"),
    "points24": dict(sft_oracle_prob=0.5, gamma=1.0),
    "blackjack": dict(
        sft_oracle_prob=0.0, sft_steps=2000, sft_lr=3e-4, learning_rate=3e-4, eval_episodes=1000
    ),
}
# The paper's settings; steps per update 512 (NumberLine, Blackjack) or 1024, in minibatches of 128.
# A 7B model's full SFT needs ~150 GB (bf16 weights and gradients, fp32 copies, Adam): on one GPU
# add --lora-in-sft (SFT trains LoRA only; memory: --dry-run)
PAPER_PRESET = dict(
    temperature=0.2, thought_coef=0.5, max_new_tokens=256, clip_coef=0.1, vf_clip=0.1, kl_coef=0.0,
    gamma=0.9, gae_lambda=0.95, update_epochs=4, adv_norm="rollout", value_input="last",
    learning_rate=1e-5, adam_beta2=0.999, max_grad_norm=0.01, grad_clip="joint", total_steps=15000,
    num_envs=4, micro_batch_size=4, gradient_checkpointing=True, sft_lr=2e-5, lora_in_sft=False,
    lora_rank=128, lora_alpha=256.0, lora_dropout=0.05, lora_targets="all-linear", ent_coef=0.0,
)  # fmt: skip


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = checks.parse_cli(Args, argv)  # HfArgumentParser; a bad or unknown flag: one line
    given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    given = {"cot" if name == "no_cot" else name for name in given}
    if args.resume:
        args = checkpoints.resumed_args(args, given)  # the run's own settings, from its checkpoint
    else:  # the game's defaults, then the paper's (--preset paper); any flag typed wins
        settings = dict(GAME_DEFAULTS[args.task])
        if args.preset == "paper":  # 512 or 1024 steps per update, over however many envs
            steps = 1024 if args.task in ("ezpoints", "points24") else 512
            n_envs = min(steps, args.num_envs) if "num_envs" in given else PAPER_PRESET["num_envs"]
            settings.update(PAPER_PRESET, num_steps=steps // n_envs, num_minibatches=steps // 128)
        for key in settings.keys() - given:
            setattr(args, key, settings[key])
        args.__post_init__()
    return checks.check_args(args, EVAL_SEED)  # every value in range, or what to change


# ---- PROMPTS: one single-turn prompt per step; what is in the image stays out of the text ----
GAME_RULES = {
    "numberline": "You are playing NumberLine. The image shows a target and a current number "
    "from 0 to 5; each move adds or subtracts one. Reach the target.",
    "ezpoints": "You are playing EZPoints. The image shows two playing cards; J, Q and K count "
    "as 10. Write a formula that uses the number of each card once and equals 12, one number or "
    "operator per move, then choose = .",
    "points24": "You are playing Points24. The image shows four playing cards; A counts as 1 and "
    "J, Q and K as 10. Write a formula that uses the number of each card once and equals 24, one "
    "token per move, then choose = .",
    "blackjack": "You are playing Blackjack. The image shows the dealer's cards at the top, one "
    "face down, and your cards below. An ace counts 1 or 11 and J, Q and K count 10. Get closer "
    "to 21 than the dealer without going over.",
}


def build_prompt(task, info, action_names, cot):
    """The user turn's text. Only the points games' formula is state given as text."""
    legal = ", ".join(f'"{a}"' for a in action_names)
    text = f"{GAME_RULES[task]} Legal actions: {legal}."
    if task in ("ezpoints", "points24"):
        text += f' The formula so far: "{" ".join(info["Formula"])}".'
    if cot:
        return text + (
            ' Answer in JSON, thoughts first: {"thoughts": "what you see and plan", '
            '"action": "a legal action"}'
        )
    return text + ' Answer in JSON with the action only: {"action": "a legal action"}'


def chat_prompt(processor, text):
    """The model's own chat template with one image and the text (no one family's template)."""
    content = [{"type": "image"}, {"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def task_prompts(processor, task, infos, cot):
    """The chat-rendered prompt of each env's current state (one per info)."""
    names = envs.TASKS[task].action_names
    return [chat_prompt(processor, build_prompt(task, info, names, cot)) for info in infos]


def thought_text(task, info, thoughts="plan"):
    """What the thoughts should read out of the image (the SFT target and the read-out check),
    then a plan: NumberLine's comparison (the paper's prompt asks to think it through first),
    EZPoints' formula, whether a hit can bust. thoughts="state": the state only (EZPoints')."""
    if task == "numberline":
        side = "higher" if info["Target"] > info["Current"] else "lower"
        text = f"current is {info['Current']}, target is {info['Target']}, the target is {side}"
    elif task in ("ezpoints", "points24"):
        text = "numbers are " + ", ".join(str(n) for n in info["Numbers"])
        if task == "ezpoints":  # then the plan: the formula to write, from the one so far
            formula = envs.EZPoints.plan(info["Numbers"], info["Formula"])
            text += f", {' '.join(formula)} makes 12" if formula else ", nothing makes 12 now"
    else:
        values = [envs.label_value(name[:-1]) for name in info["Player Card"]]  # an ace as 1
        total, up = info["Player Total"], info["Dealer Total"]
        risk = "can" if sum(values) >= 12 else "cannot"  # a 10 busts a hard 12 or more
        cards = ", ".join(str(v) for v in values)  # the cards, their sum, what a hit risks
        text = f"my cards are {cards}, my total is {total}, dealer shows {up}, a hit {risk} bust"
    state_only = thoughts == "state" and task != "points24"  # Points24's hold no plan
    return text.rsplit(", ", 1)[0] if state_only else text  # a plan is one clause, no comma


def answer_text(task, info, action_name, cot, thoughts="plan"):
    """A well-formed answer: thoughts first, action last (the paper's format)."""
    if cot:
        return f'{{"thoughts": "{thought_text(task, info, thoughts)}", "action": "{action_name}"}}'
    return f'{{"action": "{action_name}"}}'


# ---- PARSER: text -> legal action (random legal action if none or several are named) ----
ACTION_KEY = '"action":'


def parse_action(text, action_names, rng=None):
    """(index, parsed). Reads the text after the last "action": key, lower-cased. Exactly one
    legal action named there, as a whole token ("10" never counts as "1"), gives parsed=True;
    else a uniformly random legal action from `rng` and parsed=False. Never raises."""
    text = str(text).lower()
    start = text.rfind(ACTION_KEY)
    if start >= 0:
        tail = text[start + len(ACTION_KEY) :]
        whole = [rf"(?<![0-9a-z]){re.escape(name.lower())}(?![0-9a-z])" for name in action_names]
        named = [i for i, pattern in enumerate(whole) if re.search(pattern, tail)]
        if len(named) == 1:
            return named[0], True
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.integers(len(action_names))), False


# ---- MODEL: loading (the embedded tiny LLaVA or any checkpoint), LoRA, value head, scoring ----
# --model tiny: the 0.5M-parameter LLaVA in this repository, a checkpoint folder like any other
TINY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny-llava")


def load_model(name, device, dtype, trust_remote_code=False):
    """The same Auto* calls for the tiny model and for real checkpoints."""
    if name == "tiny":
        name = checks.tiny_folder(TINY_MODEL)  # or what to do if the folder is missing
    remote = dict(trust_remote_code=trust_remote_code)
    with checks.loading(name):  # a wrong --model: one line that says what to pass instead
        config = transformers.AutoConfig.from_pretrained(name, **remote)
        # tiling families (LLaVA-NeXT, Qwen-VL, ...) see a 300x300 frame as one bounded view
        processor_kw, model_kw, mrope = checks.family_bounds(config, name, trust_remote_code)
        processor = AutoProcessor.from_pretrained(name, **remote, **processor_kw)
        vlm = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, **remote, **model_kw)
    # an image processor and a chat template, or a clear error; the checkpoint's sampling settings
    # dropped (a repetition penalty would sample another policy than score() scores: off-policy)
    checks.check_checkpoint(name, config, processor, vlm)
    processor.tokenizer.padding_side = "left"  # so that every answer starts at column P
    vlm.mrope = mrope  # Qwen-VL builds its own 3-D positions from the image grid
    return processor, vlm.to(device)


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A dropout(x). B starts at zero: a new adapter changes nothing.
    A and B are kept in fp32 so that small updates are not lost in bf16."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        device, d_in = base.weight.device, base.in_features
        self.lora_A = nn.Parameter(torch.randn(rank, d_in, device=device) / math.sqrt(d_in))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        delta = self.dropout(x).float() @ self.lora_A.T @ self.lora_B.T  # (..., out)
        return self.base(x) + (self.scale * delta).to(x.dtype)


LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(vlm, rank, alpha, dropout, targets):
    """Freeze the VLM and wrap the target linear layers with LoRA. 'language': the LM's attention
    and MLP projections (the LM is `language_model`, or `text_model` in Idefics3/SmolVLM);
    'all-linear': every linear layer but the output head (LM, tower, projector: the paper)."""
    vlm.requires_grad_(False)

    def is_target(name, module):
        if not isinstance(module, nn.Linear) or module is vlm.get_output_embeddings():
            return False
        in_lm = "language_model" in name or "text_model" in name
        return targets == "all-linear" or (in_lm and name.split(".")[-1] in LM_PROJECTIONS)

    names = [name for name, module in vlm.named_modules() if is_target(name, module)]
    assert names, "no linear layer matched --lora-targets; this model family is not supported yet"
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = vlm.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return len(names)


class Standardize(nn.Module):
    """x -> (x - mean) / std: the value head's first layer (fit_critic_input sets mean and std)."""

    def __init__(self, size):
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("std", torch.ones(size))

    def forward(self, x):
        return (x - self.mean) / self.std


class Policy(nn.Module):
    """The VLM (actor) plus a value head (critic) on the VLM's final hidden states of the prompt."""

    def __init__(self, vlm, processor, temperature, thought_coef, value_input="last"):
        super().__init__()
        self.vlm, self.processor = vlm, processor
        self.temperature, self.thought_coef = temperature, thought_coef
        self.value_input = value_input  # what the critic reads: see state_value
        self.reference = None  # a frozen copy of the VLM as RL starts, if --kl-coef > 0
        hidden = vlm.config.get_text_config().hidden_size
        device = vlm.get_output_embeddings().weight.device
        # the paper's MLP in fp32 (whatever the VLM's dtype), input standardized (fit_critic_input)
        self.value_head = nn.Sequential(
            Standardize(hidden), nn.Linear(hidden, 1024), nn.ReLU(), nn.Linear(1024, 512),
            nn.ReLU(), nn.Linear(512, 1),
        ).to(device)  # fmt: skip
        tok = processor.tokenizer
        self.eos_id, self.pad_id = tok.eos_token_id, tok.pad_token_id
        # the image token and padding can never be sampled; scoring masks them the same way
        image_id = getattr(vlm.config, "image_token_id", None)
        self.banned = sorted({t for t in (image_id, self.pad_id) if t not in (None, self.eos_id)})

    def device(self):
        return self.value_head[1].weight.device  # [0]: Standardize, [1]: the first Linear

    def encode_prompts(self, frames, prompts):
        """Frames + chat-rendered prompts -> a left-padded batch: input_ids (B, P), ..."""
        images = [[frame] for frame in frames]
        batch = self.processor(images=images, text=list(prompts), padding=True, return_tensors="pt")
        return {k: v.to(self.device()) for k, v in batch.items()}

    def generate(self, frames, prompts, greedy, max_new_tokens):
        """One batched generate for all envs: the answer token ids per env, EOS included."""
        batch = self.encode_prompts(frames, prompts)
        config = checks.sampling_config(self, greedy, max_new_tokens)  # temperature; no top-k/p
        with torch.no_grad():
            seqs = self.vlm.generate(**batch, generation_config=config)  # (B, P + A)
        answers = []
        for row in seqs[:, batch["input_ids"].shape[1] :].tolist():  # (B, A) -> lists
            answers.append(row[: row.index(self.eos_id) + 1] if self.eos_id in row else row)
        return answers

    def token_weights(self, answer_ids):
        """lambda for thought tokens, 1 for action tokens: the action span starts at the token that
        holds the first character of the last "action": key (character offsets, no token ids)."""
        decode = lambda ids: self.processor.tokenizer.decode(ids, skip_special_tokens=True)
        text = decode(answer_ids)  # the key found case-blind in this text (lower() can lengthen it)
        keys = re.finditer(re.escape(ACTION_KEY), text, re.IGNORECASE | re.ASCII)  # as the parser
        start = max((key.start() for key in keys), default=-1)
        weights = [self.thought_coef] * len(answer_ids)
        if start < 0:
            return weights  # no action key: the action was random, only thoughts were written
        n = 0  # the first token whose decoded prefix reaches past `start`
        while n < len(answer_ids) - 1 and len(decode(answer_ids[: n + 1])) <= start:
            n += 1
        return weights[:n] + [1.0] * (len(answer_ids) - n)

    def score(self, frames, prompts, answers, weights, temperature=None, reference=False):
        """The one scoring function (rollout, PPO update and SFT). Returns
        logprob (B,) = sum_t w_t log softmax(logits_t / temperature)[answer_t], value (B,),
        entropy (B,) and the next-token log-probs logp (B, A, V); under the frozen reference VLM
        (--kl-coef) if reference=True."""
        temperature = temperature or self.temperature
        vlm = self.reference if reference else self.vlm
        batch = self.encode_prompts(frames, prompts)
        B, P, A = len(answers), batch["input_ids"].shape[1], max(len(a) for a in answers)
        answer_ids = torch.full((B, A), self.eos_id, dtype=torch.long)  # (B, A), right-padded
        answer_mask = torch.zeros(B, A, dtype=torch.long)  # (B, A), 1 on real answer tokens
        w = torch.zeros(B, A)  # (B, A), per-token weights
        for i, (ids, ws) in enumerate(zip(answers, weights)):
            answer_ids[i, : len(ids)], answer_mask[i, : len(ids)] = torch.tensor(ids), 1
            w[i, : len(ws)] = torch.tensor(ws)
        answer_ids, answer_mask, w = (x.to(self.device()) for x in (answer_ids, answer_mask, w))
        input_ids = torch.cat([batch.pop("input_ids"), answer_ids], 1)  # (B, T)
        attention_mask = torch.cat([batch.pop("attention_mask"), answer_mask], 1)  # (B, T)
        for key in ("mm_token_type_ids", "token_type_ids"):  # answers are text (type 0)
            if key in batch:
                zeros = torch.zeros_like(answer_ids).to(batch[key].dtype)
                batch[key] = torch.cat([batch[key], zeros], 1)
        hidden = self.hidden_states(input_ids, attention_mask, batch, vlm)  # (B, T, H)
        # the output layer, then any soft-cap or scale the family's forward applies (checks.py)
        logits = checks.output_logits(vlm, hidden[:, P - 1 : -1]) / temperature  # (B, A, V)
        if self.banned:
            logits[..., self.banned] = -torch.inf
        logp = logits.log_softmax(-1)  # (B, A, V)
        token_logp = logp.gather(-1, answer_ids[..., None])[..., 0]  # (B, A)
        mask = answer_mask.float()
        entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)  # (B, A)
        value = self.state_value(hidden[:, :P], attention_mask[:, :P])  # (B,)
        entropy = (entropy * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        return (token_logp * w).sum(-1), value, entropy, logp

    def hidden_states(self, input_ids, attention_mask, extra, vlm=None):
        """The VLM trunk's final hidden states (B, T, H); positions count real tokens only, as
        generate() does (M-RoPE models build their 3-D positions from the image grid)."""
        vlm = self.vlm if vlm is None else vlm
        positions = None if vlm.mrope else (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        out = vlm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                        use_cache=False, **extra)  # fmt: skip
        return out.last_hidden_state

    def state_value(self, hidden, prompt_mask):
        """V(s) from the prompt's final hidden states (B, P, H), never from the answer. A 7B model
        carries the state into its last prompt token (the paper's value_input "last"); the tiny
        one does not (its last-token head gave 0.78-0.81 on all 30 NumberLine states). "mean":
        the mean over the prompt tokens, image tokens included, detached, so the value loss
        trains the head only (through the trunk it cut the thoughts' read-out to 0.56-0.82)."""
        return self.value_head(self.state_features(hidden, prompt_mask))[:, 0]  # (B,)

    def state_features(self, hidden, prompt_mask):  # the value head's input (B, H), in fp32
        if self.value_input == "last":
            return hidden[:, -1].float()  # the last prompt token, thanks to left padding
        m = prompt_mask[..., None].float()  # (B, P, 1); summed in fp32 (bf16 counts past 256 round)
        return ((hidden.float() * m).sum(1) / m.sum(1)).detach()

    @torch.no_grad()
    def features(self, frames, prompts):  # the value head's input (B, H) from frames and prompts
        batch = self.encode_prompts(frames, prompts)
        mask = batch.pop("attention_mask")
        hidden = self.hidden_states(batch.pop("input_ids"), mask, batch)  # (B, P, H)
        return self.state_features(hidden, mask)

    @torch.no_grad()
    def value(self, frames, prompts):  # V(s) alone, to bootstrap the last step of a rollout
        return self.value_head(self.features(frames, prompts))[:, 0]  # (B,)


# ---- ROLLOUT: N envs step together; one batched generate per step ----
@dataclass
class Sample:
    """One env step as the update needs it: re-scored later with its own frame and prompt."""

    frame: np.ndarray  # (300, 300, 3) uint8
    prompt: str  # the chat-rendered prompt of this very step
    answer: list  # answer token ids, EOS included
    weights: list  # lambda on thought tokens, 1 on action tokens


def act(policy, task, infos, frames, args, rng, greedy=False):
    """Observe, prompt, one batched generate, parse: actions, parsed, prompts, answers, texts."""
    prompts = task_prompts(policy.processor, task, infos, args.cot)
    answers = policy.generate(frames, prompts, greedy, args.max_new_tokens)
    texts = [policy.processor.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    parsed = [parse_action(text, envs.TASKS[task].action_names, rng) for text in texts]
    return [a for a, _ in parsed], [ok for _, ok in parsed], prompts, answers, texts


def new_envs(args, seeds):
    """The rollout's N envs, reset with `seeds`, and their running episode returns and lengths."""
    vec = dict(envs=[envs.TASKS[args.task]() for _ in seeds])
    first = [env.reset(seed=seed) for env, seed in zip(vec["envs"], seeds)]  # (obs, info) each
    vec["obs"], vec["infos"] = [obs for obs, _ in first], [info for _, info in first]
    vec["ep_return"], vec["ep_len"] = [0.0] * len(seeds), [0] * len(seeds)
    return vec


def rollout(policy, vec, args, rng, episodes, update=0):
    """S steps of N envs with the current policy (eval mode, no grad). `vec` (new_envs) carries
    the envs across updates; finished episodes go to `episodes` as (summed reward, length)."""
    S, N = args.num_steps, args.num_envs
    logprobs, values, rewards, dones = (torch.zeros(S, N) for _ in range(4))  # (S, N) each
    samples, parse_fails, readouts, gallery = [], 0, 0, []
    policy.eval()  # LoRA dropout off while sampling
    for t in range(S):
        step = act(policy, args.task, vec["infos"], vec["obs"], args, rng)  # observe, write, parse
        actions, parsed, prompts, answers, texts = step
        weights = [policy.token_weights(a) for a in answers]
        with torch.no_grad():
            logprob, value, _, _ = policy.score(vec["obs"], prompts, answers, weights)
        where = f"update {update}, rollout step {t}"
        checks.check_finite("the rollout's log-prob or value", torch.cat([logprob, value]), where)
        logprobs[t], values[t] = logprob.cpu(), value.cpu()
        parse_fails += parsed.count(False)
        expected = [thought_text(args.task, i, args.thoughts) for i in vec["infos"]]  # read-out
        readouts += sum(e in s for e, s in zip(expected, texts))
        name = envs.TASKS[args.task].action_names[actions[0]]
        gallery.append(dict(info=vec["infos"][0], answer=texts[0], action=name, parsed=parsed[0]))
        for i, env in enumerate(vec["envs"]):
            samples.append(Sample(vec["obs"][i], prompts[i], answers[i], weights[i]))
            obs, reward, terminated, truncated, info = env.step(actions[i])
            rewards[t, i] = reward
            vec["ep_return"][i] += reward
            vec["ep_len"][i] += 1
            if terminated or truncated:  # truncation is a loss under these games' rules
                dones[t, i] = 1.0
                episodes.append((vec["ep_return"][i], vec["ep_len"][i]))
                vec["ep_return"][i], vec["ep_len"][i] = 0.0, 0
                obs, info = env.reset()  # the env's own generator continues: no reseeding
            vec["obs"][i], vec["infos"][i] = obs, info
    next_prompts = task_prompts(policy.processor, args.task, vec["infos"], args.cot)
    next_value = policy.value(vec["obs"], next_prompts).cpu()  # (N,) bootstrap V(s_S)
    return dict(samples=samples, logprobs=logprobs, values=values, rewards=rewards, dones=dones,
                next_value=next_value, format_error_rate=parse_fails / (S * N),
                readout_acc=readouts / (S * N), gallery=gallery[:3])  # fmt: skip


# ---- GAE ----
def compute_gae(rewards, values, dones, next_value, gamma, gae_lambda):
    """Generalized advantage estimation. rewards, values, dones: (S, N); dones[t] = 1 when the
    episode ended with step t (so step t+1 starts a new one; CleanRL stores it one step later);
    next_value: (N,) = V(s_S). Returns advantages, returns."""
    S = rewards.shape[0]
    advantages = torch.zeros_like(rewards)  # (S, N)
    lastgaelam = torch.zeros_like(next_value)  # (N,)
    for t in reversed(range(S)):
        next_values = next_value if t == S - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_values * nonterminal - values[t]
        lastgaelam = delta + gamma * gae_lambda * nonterminal * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values


# ---- PPO UPDATE: clipped surrogate, clipped value loss, KL to the SFT policy, minibatches ----
def reference_kl(logp, ref_logp, lengths):
    """KL(pi || pi_ref) over the whole vocabulary at every answer position, averaged over each
    answer's tokens, then over the batch. logp, ref_logp: (B, A, V). Exact, not a sampled
    estimate: it also charges the mass the policy moves onto tokens it did not sample (a broken
    answer's), and it is 0 when pi = pi_ref. Banned tokens (-inf in both) add nothing."""
    mask = torch.zeros(logp.shape[:2], device=logp.device)  # (B, A)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    allowed = torch.isfinite(logp)  # (B, A, V)
    logp, ref_logp = logp.masked_fill(~allowed, 0.0), ref_logp.masked_fill(~allowed, 0.0)
    kl = (logp.exp() * allowed * (logp - ref_logp)).sum(-1)  # (B, A)
    return ((kl * mask).sum(-1) / mask.sum(-1)).mean()


def ppo_update(policy, optimizer, data, advantages, returns, args, generator, update):
    b_samples = data["samples"]  # B samples, t-major like .reshape(-1)
    b_logprobs, b_values = data["logprobs"].reshape(-1), data["values"].reshape(-1)  # (B,)
    b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)  # (B,)
    if args.adv_norm == "rollout" and args.batch_size > 1:  # once per rollout (official code)
        b_advantages = (b_advantages - b_advantages.mean()) / (b_advantages.std() + 1e-8)
    actor = [p for p in policy.vlm.parameters() if p.requires_grad]
    critic = list(policy.value_head.parameters())
    keys = ("pg_loss", "v_loss", "entropy", "kl_ref", "approx_kl", "clipfrac", "grad_norm")
    stats, first_ratio = {key: [] for key in keys}, None
    policy.train()
    for epoch in range(args.update_epochs):
        where = f"update {update}, epoch {epoch}"
        b_inds = torch.randperm(args.batch_size, generator=generator)
        for mb_inds in b_inds.tensor_split(args.num_minibatches):
            mb_advantages = b_advantages[mb_inds]
            if args.adv_norm == "minibatch" and len(mb_inds) > 1:  # (a minibatch of 1: no spread)
                std = mb_advantages.std() + 1e-8
                mb_advantages = (mb_advantages - mb_advantages.mean()) / std
            optimizer.zero_grad()
            micro = args.micro_batch_size  # gradient accumulation over micro-batches
            for inds, adv in zip(mb_inds.split(micro), mb_advantages.split(micro)):
                batch = [b_samples[i] for i in inds]
                frames, prompts = [s.frame for s in batch], [s.prompt for s in batch]
                answers, weights = [s.answer for s in batch], [s.weights for s in batch]
                scored = policy.score(frames, prompts, answers, weights)
                newlogprob, newvalue, entropy, newlogp = scored  # (B,) x 3, (B, A, V)
                newlogprob, newvalue, entropy = newlogprob.cpu(), newvalue.cpu(), entropy.cpu()
                checks.check_finite("the log-probability", newlogprob, where)
                checks.check_finite("the value", newvalue, where)
                logratio = newlogprob - b_logprobs[inds]
                ratio = logratio.exp()
                if first_ratio is None:  # 1 to rounding: the rollout's scoring path and weights
                    first_ratio = ratio.detach()
                with torch.no_grad():
                    stats["approx_kl"].append(((ratio - 1) - logratio).mean().item())  # k3
                    clipped = (ratio - 1.0).abs() > args.clip_coef
                    stats["clipfrac"].append(clipped.float().mean().item())
                pg_loss1 = -adv * ratio
                pg_loss2 = -adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()
                v_loss = (newvalue - b_returns[inds]) ** 2
                if args.vf_clip > 0:  # pessimistic, as the ratio: V kept near its rollout value
                    v_delta = (newvalue - b_values[inds]).clamp(-args.vf_clip, args.vf_clip)
                    v_loss = torch.max(v_loss, (b_values[inds] + v_delta - b_returns[inds]) ** 2)
                v_loss = 0.5 * v_loss.mean()
                kl_ref = torch.zeros(())
                if policy.reference is not None:  # --kl-coef: stay near the SFT policy
                    with torch.no_grad():  # ref[3]: the SFT policy's next-token log-probs
                        ref = policy.score(frames, prompts, answers, weights, reference=True)
                    kl_ref = reference_kl(newlogp, ref[3], [len(a) for a in answers]).cpu()
                loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss
                loss = loss + args.kl_coef * kl_ref
                checks.check_finite("the PPO loss", loss, where)
                (loss * len(inds) / len(mb_inds)).backward()
                for key, val in zip(keys, (pg_loss, v_loss, entropy.mean(), kl_ref)):
                    stats[key].append(val.item())
            parallel.average_gradients(actor + critic)  # torchrun: the mean over workers
            # "apart": each clipped on its own; clipped together (the paper; --grad-clip joint) the
            # value loss's larger gradient shrank the policy's step (NumberLine: head 4.2, VLM 1.7)
            groups = [actor, critic] if args.grad_clip == "apart" else [actor + critic]
            norms = [nn.utils.clip_grad_norm_(g, args.max_grad_norm).item() for g in groups]
            checks.check_finite("the gradient norm", torch.tensor(norms), where)
            stats["grad_norm"].append(norms[0])  # the VLM's, or (joint) both together's
            optimizer.step()
    out = {k: float(np.mean(v)) for k, v in stats.items()}
    # explained_var: 1 when V(s) predicts the returns, 0 when it does no better than their mean;
    # NaN (logged "flat") when the returns hardly vary (std < 0.05): a variance ratio of noise
    y_pred, y_true = b_values.numpy(), b_returns.numpy()
    flat = np.std(y_true) < 0.05
    out["explained_var"] = np.nan if flat else float(1 - np.var(y_true - y_pred) / np.var(y_true))
    out["first_ratio_dev"] = float((first_ratio - 1).abs().max())
    return out


# ---- SFT WARM START: cross-entropy on answers written from the env oracle ----
def sft_answers(args, env, rng, n, oracle_prob, tokenizer, readout_only=False):
    """n (frame, info, answer ids) from random states: a reset, then 0-3 moves, each the oracle's
    or a random one (states off the oracle's path too). The thoughts read the state right; the
    action is the oracle's with chance `oracle_prob`, else one of env.sensible_actions() at random
    (EZPoints: a move that keeps the formula well formed; the other games: any action)."""
    names, out = env.action_names, []
    for _ in range(n):
        obs, info = env.reset(seed=int(rng.integers(2**31)))
        best, ok = env.oracle(), env.sensible_actions()  # in the state kept, never a terminal one
        for _ in range(int(rng.integers(4))):
            move = best if rng.random() < 0.5 else int(rng.integers(len(names)))
            next_obs, _, terminated, truncated, next_info = env.step(move)
            if terminated or truncated:
                break
            obs, info, best, ok = next_obs, next_info, env.oracle(), env.sensible_actions()
        action = best if rng.random() < oracle_prob else ok[int(rng.integers(len(ok)))]
        text = thought_text(args.task, info, args.thoughts)
        if not readout_only:
            text = answer_text(args.task, info, names[action], args.cot, args.thoughts)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        out.append((obs, info, ids + [tokenizer.eos_token_id]))
    return out


def held_out_states(policy, args, seed, n):
    """n states drawn as SFT's are, from their own generator: frames, prompts and infos."""
    rng, tok = np.random.default_rng(seed), policy.processor.tokenizer
    data = sft_answers(args, envs.TASKS[args.task](), rng, n, 0.0, tok, readout_only=True)
    infos = [info for _, info, _ in data]
    prompts = task_prompts(policy.processor, args.task, infos, args.cot)
    return [frame for frame, _, _ in data], prompts, infos


def sft_warm_start(policy, args, rng):
    env, tok = envs.TASKS[args.task](), policy.processor.tokenizer
    params = set_trainable(policy, args, "sft")
    optimizer = parallel.Adam(params, lr=args.sft_lr)  # torch's Adam, fp32 copies of bf16 weights
    check = held_out_states(policy, args, args.seed + 10**6, 16)  # own draws; SFT may draw them too
    check = (*check[:2], [thought_text(args.task, i, args.thoughts) for i in check[2]])
    policy.train()
    for step in range(1, args.sft_steps + 1):
        # the pretrained tiny model reads already: read-out steps first help an untrained one only
        n, readout_only = args.sft_batch_size, step <= args.sft_readout
        data = sft_answers(args, env, rng, n, args.sft_oracle_prob, tok, readout_only)
        prompts = task_prompts(policy.processor, args.task, [i for _, i, _ in data], args.cot)
        answers = [ids for _, _, ids in data]
        n_tokens, loss = sum(len(a) for a in answers), 0.0
        optimizer.zero_grad()
        for lo in range(0, len(data), args.micro_batch_size):  # gradient accumulation
            part = slice(lo, lo + args.micro_batch_size)
            frames, ones = [f for f, _, _ in data[part]], [[1.0] * len(a) for a in answers[part]]
            logprob = policy.score(frames, prompts[part], answers[part], ones, temperature=1.0)[0]
            part_loss = -logprob.sum() / n_tokens  # mean cross-entropy per answer token
            checks.check_finite("the SFT loss", part_loss, f"SFT step {step}")
            part_loss.backward()
            loss += part_loss.item()
        parallel.average_gradients(params)
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        report.log_sft_step(policy, args, step, loss, check)  # every 50 steps: loss, read-out


# ---- EVALUATION: fixed seeds disjoint from training; success = summed reward > 0 (the paper) ----
EVAL_SEED = 10**6  # eval seeds 10**6, 10**6 + 1, ...; training envs below: seed * 1000 + i


def evaluate(policy, args, greedy, rng):
    """Success rate, mean return, format-error rate and read-out accuracy over eval_episodes."""
    seeds = list(range(EVAL_SEED, EVAL_SEED + args.eval_episodes))
    returns, steps, fails, readouts = [], 0, 0, 0
    policy.eval()
    chunk = 4 * args.num_envs  # episodes played together in one batched generate
    for lo in range(0, len(seeds), chunk):
        group = [envs.TASKS[args.task]() for _ in seeds[lo : lo + chunk]]
        state = [[*env.reset(seed=s), 0.0, False] for env, s in zip(group, seeds[lo : lo + chunk])]
        while not all(done for *_, done in state):
            live = [i for i, (*_, done) in enumerate(state) if not done]
            infos, frames = [state[i][1] for i in live], [state[i][0] for i in live]
            actions, parsed, _, _, texts = act(policy, args.task, infos, frames, args, rng, greedy)
            for i, action, ok, text in zip(live, actions, parsed, texts):
                steps, fails = steps + 1, fails + (not ok)
                readouts += thought_text(args.task, state[i][1], args.thoughts) in text
                obs, reward, terminated, truncated, info = group[i].step(action)
                state[i] = [obs, info, state[i][2] + reward, terminated or truncated]
        returns += [total for _, _, total, _ in state]
    success = float(np.mean([r > 0 for r in returns]))
    return dict(success=success, mean_return=float(np.mean(returns)),
                format_error_rate=fails / steps, readout_acc=readouts / steps)  # fmt: skip


# ---- TRAIN: SFT warm start, evaluate, PPO, evaluate again ----
def setup(args):
    """Seeds, device, output dir, model, policy: policy, rng (numpy), generator, prompt shape."""
    seed = args.seed + RANK  # each torchrun worker samples differently (rank 0: --seed)
    random.seed(seed)  # the one seeding block
    np.random.seed(seed)
    torch.manual_seed(seed)  # weights of new layers, sampling in generate
    rng = np.random.default_rng(seed)  # parser fallback, SFT data, evaluation
    generator = torch.Generator().manual_seed(seed)  # minibatch shuffling
    device, dtype = parallel.device_and_dtype(args.dtype)  # a GPU if there is one, else the CPU
    parallel.start_workers(device)  # torchrun: join the other workers
    checkpoints.make_output_dir(args)
    model_path = checkpoints.resumed_model(args)  # a resumed run's SFT model, if it saved one
    processor, vlm = load_model(model_path or args.model, device, dtype, args.trust_remote_code)
    if args.gradient_checkpointing:
        vlm.activation_checkpointing_enable()  # every decoder layer recomputed in the backward
    policy = Policy(vlm, processor, args.temperature, args.thought_coef, args.value_input)
    checks.check_scoring(policy)  # score()'s logits are the model's own forward's, or refuse
    parallel.broadcast_weights(policy)  # torchrun: the value head starts the same everywhere
    frame, info = envs.TASKS[args.task]().reset(seed=0)  # a first prompt: its length in tokens
    prompt = task_prompts(processor, args.task, [info], args.cot)[0]
    shape = report.prompt_shape(policy, frame, prompt)  # (prompt tokens, image tokens)
    report.print_setup(policy, args, device, dtype, shape)  # model, prompt length, schedule
    return policy, rng, generator, shape


def set_trainable(policy, args, phase):
    """The one place that decides what trains, as SFT ("sft") and RL ("rl") start. --lora-rank 0:
    every weight, in both phases. --lora-in-sft: adapters added before SFT, and only they (and the
    value head) train in both. --lora-rank R alone: SFT trains every weight, adapters come before
    RL. Returns what trains."""
    has_lora = any(isinstance(m, LoRALinear) for m in policy.vlm.modules())
    if args.lora_rank > 0 and (phase == "rl" or args.lora_in_sft) and not has_lora:
        add_lora(policy.vlm, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
        parallel.broadcast_weights(policy)  # torchrun: every worker starts from rank 0's adapters
    if phase == "rl":  # the update scores with dropout off, as the rollout did: ratio 1
        checks.dropout_off(policy)
    module = policy if phase == "rl" else policy.vlm  # the value head trains in RL only
    params = [p for p in module.parameters() if p.requires_grad]
    report.print_trainable(policy, args, phase, params)
    return params


def fit_critic_input(policy, args, n=256):
    """The tiny model's mean prompt features differ between states by about 5% of their size: a
    value head fit 0.06 of NumberLine's state values from them, 1.00 once standardized (§8 of
    results/EXPERIMENTS.md). So the head's first layer uses their mean and std over n states."""
    frames, prompts, _ = held_out_states(policy, args, args.seed + 7, n)
    m = args.micro_batch_size
    features = [policy.features(frames[i : i + m], prompts[i : i + m]) for i in range(0, n, m)]
    features = torch.cat(features)  # (n, H)
    policy.value_head[0].mean.copy_(features.mean(0))
    policy.value_head[0].std.copy_(features.std(0).clamp(min=1e-4))
    parallel.broadcast_weights(policy)  # torchrun: every worker standardizes alike


def start_rl(policy, args):
    """What trains in RL (set_trainable), the KL reference (a frozen copy of the model as RL
    starts: the SFT policy) if --kl-coef > 0, and the optimizer."""
    params = set_trainable(policy, args, "rl")
    if args.value_input == "mean":
        fit_critic_input(policy, args)  # the head standardizes its input
    if args.kl_coef > 0 and policy.reference is None:
        policy.reference = copy.deepcopy(policy.vlm).requires_grad_(False)
    # Adam divides each step by a running RMS of past gradients; with beta2 0.999 it forgets over
    # ~1,000 steps: after quiet updates a sudden large gradient moves a weight by 0.1 / sqrt(0.001)
    # = 3.2 learning rates at once, by 1 with 0.99 (broken answers: results/EXPERIMENTS.md §19-20)
    betas = (0.9, args.adam_beta2)
    return parallel.Adam(params, lr=args.learning_rate, betas=betas, eps=1e-5)  # fp32 copies


def ppo_loop(policy, optimizer, args, rng, generator):
    """num_updates x (rollout, GAE, PPO update). Returns the metrics (also in metrics.jsonl)."""
    seeds = [args.seed * 1000 + RANK * args.num_envs + i for i in range(args.num_envs)]
    vec = new_envs(args, seeds)
    first_update, episodes, history = 1, [], []
    if args.resume:  # weights, optimizer, every RNG, the envs, the episodes and metrics so far
        restored = checkpoints.restore_checkpoint(policy, optimizer, vec, args, rng, generator)
        first_update, episodes, history = restored
    for update in range(first_update, args.num_updates + 1):
        t_update = time.time()
        lr = 0.5 * args.learning_rate * (1 + math.cos(math.pi * (update - 1) / args.num_updates))
        for group in optimizer.param_groups:  # cosine decay (update 1: the full lr)
            group["lr"] = lr
        data = rollout(policy, vec, args, rng, episodes, update)
        gae_input = (data["rewards"], data["values"], data["dones"], data["next_value"])
        advantages, returns = compute_gae(*gae_input, args.gamma, args.gae_lambda)
        stats = ppo_update(policy, optimizer, data, advantages, returns, args, generator, update)
        # success and return of the last 100 episodes, rates and losses: all workers' mean
        row = report.update_row(args, update, lr, episodes, data, stats, t_update)
        parallel.check_weights_agree(policy, row)  # torchrun: every worker's weights identical
        history.append(row)
        report.log_update(args, row, data["gallery"][0])  # metrics.jsonl and one line
        if (args.save_every and update % args.save_every == 0) or update == args.num_updates:
            checkpoints.save_checkpoint(policy, optimizer, vec, args, rng, generator, episodes,
                                        update)  # fmt: skip
    return history


def train(args):
    t0 = time.time()
    policy, rng, generator, shape = setup(args)
    if args.dry_run:  # time one rollout step and one update, print the memory they take, stop
        loop = dict(start_rl=start_rl, new_envs=new_envs, rollout=rollout,
                    compute_gae=compute_gae, ppo_update=ppo_update)  # fmt: skip
        return report.dry_run(policy, args, rng, generator, shape, loop)
    if args.resume:  # SFT and the first evaluation are done: read their result
        before = checkpoints.saved_before(args)
    else:
        if args.sft_steps:
            report.print_memory(policy, args, "SFT", shape)
            sft_warm_start(policy, args, rng)
            checkpoints.keep_sft_model(policy, args)  # the KL reference or LoRA base, for --resume
        before = None
        if RANK == 0:  # rank 0 alone evaluates; the others wait for it at the next exchange
            before = {m: evaluate(policy, args, m == "greedy", rng) for m in ("sampled", "greedy")}
        checkpoints.save_before(args, before)
    baselines = report.baseline_success(args, EVAL_SEED)  # random and oracle, on the eval seeds
    report.print_before(before, baselines)
    optimizer = start_rl(policy, args)
    report.print_memory(policy, args, "RL", shape)
    history = ppo_loop(policy, optimizer, args, rng, generator)
    if RANK > 0:
        return None
    after = {m: evaluate(policy, args, m == "greedy", rng) for m in ("sampled", "greedy")}
    # the learning curve, the final model, summary.json and the before/after table
    return report.finish_run(policy, args, history, before, after, baselines, t0, shape)


# ---- MAIN ----
def main(argv=None):
    args = parse_args(argv)
    if RANK > 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints
    try:
        train(args)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        parallel.stop_workers()


if __name__ == "__main__":
    main()
