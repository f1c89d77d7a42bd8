"""rl4vlm-min: fine-tune a vision-language model as a decision-making agent with PPO (RL4VLM), in one file.

The method (Zhai et al., "Fine-Tuning Large Vision-Language Models as Decision-Making Agents via
Reinforcement Learning", NeurIPS 2024). At every step the VLM sees the env's frame and a task prompt,
writes a short chain of thought and then the action as text ({"thoughts": ..., "action": ...}); a
parser maps the text to a legal action; the env returns a reward. The action's log-probability is
    log pi(a|s) = lambda * sum log p(thought tokens) + sum log p(action tokens)      (paper, eq. 4.2)
and PPO with GAE trains the VLM and a value head on those per-step rewards. The pipeline is the
paper's: a supervised warm start (SFT) on answers written from an oracle, then RL.

Run (CPU, nothing downloaded: an embedded tiny LLaVA is built in code):
    python rl4vlm_min.py --task numberline
Run (one GPU, a real checkpoint, the paper's hyper-parameters; no real checkpoint has run here yet):
    python rl4vlm_min.py --task numberline --model llava-hf/llava-v1.6-mistral-7b-hf --preset paper --dry-run
    python rl4vlm_min.py --task numberline --model llava-hf/llava-v1.6-mistral-7b-hf --preset paper
Continue a stopped run, or train data-parallel on K GPUs (or CPU processes):
    python rl4vlm_min.py --resume runs/numberline-seed1
    torchrun --nproc_per_node K rl4vlm_min.py --task numberline ...

Shape letters: N envs, S steps per env per update, B batch (samples), P prompt tokens, A answer
tokens, T = P + A, V vocabulary, H hidden size.

Deviations from the paper, each on purpose:
- The default model is a 0.5M-parameter LLaVA built from a config (CLIP-style tower, Llama-style
  LM, word-level tokenizer), so the whole loop runs on a laptop CPU in minutes. Its SFT data uses
  random actions (--sft-oracle-prob 0 for NumberLine) so that SFT teaches it to see and to answer in
  format, and RL teaches it to act; the paper's SFT data has the oracle's actions.
- Tiny-model defaults differ from the paper's (lr 1e-4, clip 0.2, grad-norm 0.5, 16 envs x 8 steps,
  3,072 env steps, and RL trains all weights instead of LoRA adapters: measured here, all weights
  (three seeds) learned more steadily than LoRA (two seeds); see the README); `--preset paper` restores
  §2 of the paper's settings. The logic (lambda split, GAE, clipped PPO) is the same either way.
- Two additions for the tiny model (the paper preset has neither): the value head reads the mean of the
  prompt's final hidden states, detached (the paper: the last prompt token, which the tiny model does not
  make carry the state); and a KL penalty toward the SFT policy (--kl-coef 0.5, exact over the
  vocabulary at every answer token, logged as kl_ref), which made the bursts of broken answers
  ("action": "}) that PPO's updates caused rarer and shorter (results/EXPERIMENTS.md).
- Truncation (NumberLine's 10-move limit, the points games' formula cap) ends the episode like a
  termination: it is part of those games' rules and is scored as a loss, so nothing is bootstrapped.
- LoRA dropout acts in SFT only. RL samples, scores the old log-probs and runs the update with dropout
  off, so old and new log-probs come from one function and the first minibatch's ratio is exactly 1
  on every update (the official code sampled with dropout on; TRL's PPO also turns dropout off).
- generate() gets every sampling setting from the run (Policy.sampling_config); a checkpoint's own
  generation_config (a repetition penalty, top-k) is dropped at load, since score() would not apply it.
- The official code's defects are not repeated: the thought/action split comes from character
  offsets (not hard-coded token ids), every sample is re-scored with its own prompt, prompts are
  batched with left padding, and checkpoints and evaluation exist.
"""
import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser

import envs

TASK_NAMES = list(envs.TASKS)
# Data parallel: torchrun starts WORLD workers and tells each its RANK (1 and 0 without torchrun; see DATA PARALLEL)
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
transformers.utils.logging.disable_progress_bar()     # no load/save progress bars for a 1 MB model


# ---- CONFIG ----
@dataclass
class Args:
    task: Literal["numberline", "ezpoints", "points24", "blackjack"] = field(default="numberline", metadata={"help": "which card env to learn"})
    model: str = field(default="tiny", metadata={"help": "'tiny' (embedded LLaVA built in code) or a Hugging Face id / local path of an image-text-to-text model"})
    preset: Literal["tiny", "paper"] = field(default="tiny", metadata={"help": "'paper' sets the paper's hyper-parameters (§2 of RL4VLM) before your flags"})
    seed: int = field(default=1, metadata={"help": "seeds torch, numpy, python, the envs, sampling and the SFT data"})
    output_dir: str = field(default="", metadata={"help": "where metrics, checkpoints and plots go (default runs/<task>-seed<seed>)"})
    # rollout
    num_envs: int = field(default=16, metadata={"help": "N: envs stepped together with one batched generate"})
    num_steps: int = field(default=8, metadata={"help": "S: steps per env per PPO update (batch = N * S)"})
    total_steps: int = field(default=3072, metadata={"help": "env steps of RL in total"})
    temperature: float = field(default=0.2, metadata={"help": "sampling temperature; logits are divided by it when scoring too"})
    max_new_tokens: int = field(default=48, metadata={"help": "longest answer the model may write"})
    cot: bool = field(default=True, metadata={"help": "ask for thoughts before the action (--no-cot: the action only)"})
    thought_coef: float = field(default=0.5, metadata={"help": "lambda: weight of the thought tokens' log-prob (action tokens weigh 1)"})
    # PPO and GAE
    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate of the RL phase, cosine-decayed to 0"})
    gamma: float = field(default=0.9, metadata={"help": "discount factor"})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda"})
    update_epochs: int = field(default=4, metadata={"help": "passes over the rollout batch per update"})
    minibatch_size: int = field(default=32, metadata={"help": "samples per optimizer step"})
    micro_batch_size: int = field(default=32, metadata={"help": "samples per forward/backward (gradient accumulation up to minibatch_size)"})
    clip_coef: float = field(default=0.2, metadata={"help": "PPO clip range for the ratio and the value"})
    ent_coef: float = field(default=0.0, metadata={"help": "entropy bonus (mean per answer token)"})
    kl_coef: float = field(default=0.5, metadata={"help": "weight of KL(policy || reference), exact over the vocabulary, per answer token; the reference is a frozen copy of the model as RL starts (logged as kl_ref; 0 = off, the paper)"})
    vf_coef: float = field(default=0.5, metadata={"help": "value-loss coefficient"})
    max_grad_norm: float = field(default=0.5, metadata={"help": "global gradient-norm clip"})
    # model
    value_input: Literal["mean", "last"] = field(default="mean", metadata={"help": "what the value head reads: the mean of the prompt's final hidden states (detached), or the last prompt token's (the paper)"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank of the RL phase (SFT trains all weights); 0 = RL trains all weights too"})
    lora_alpha: float = field(default=64.0, metadata={"help": "LoRA scale is alpha / rank"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input in SFT (RL runs with dropout off, see set_trainable)"})
    lora_targets: Literal["language", "all-linear"] = field(default="language", metadata={"help": "LoRA on the LM's attention+MLP projections, or on every linear layer (the paper)"})
    lora_in_sft: bool = field(default=False, metadata={"help": "add LoRA before SFT so SFT trains the adapters too (a full fine-tune of a 7B model does not fit one GPU)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass: less memory, more compute"})
    # SFT warm start
    sft_steps: int = field(default=500, metadata={"help": "supervised warm-start steps before RL (0 = none)"})
    sft_batch_size: int = field(default=16, metadata={"help": "answers per SFT step"})
    sft_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the SFT warm start"})
    sft_readout_steps: int = field(default=-1, metadata={"help": "first SFT steps train the read-out alone (answers hold only the thoughts): the tiny model learns to see first; -1 = half of --sft-steps"})
    sft_oracle_prob: float = field(default=-1.0, metadata={"help": "chance that an SFT answer's action is the oracle's (else uniform random); -1 = the task's default"})
    # evaluation and output
    eval_episodes: int = field(default=200, metadata={"help": "episodes per evaluation, on fixed seeds disjoint from training"})
    save_every: int = field(default=0, metadata={"help": "write a checkpoint every K updates (0 = only at the end)"})
    resume: str = field(default="", metadata={"help": "continue the run saved in this --output-dir from its last checkpoint"})
    trust_remote_code: bool = field(default=False, metadata={"help": "let a checkpoint run its own Python code (only for models you trust)"})
    dry_run: bool = field(default=False, metadata={"help": "load, print the memory estimate, time one rollout step and one PPO update, and exit"})

    def __post_init__(self):        # derived sizes, computed once, right here
        self.output_dir = self.output_dir or f"runs/{self.task}-seed{self.seed}"
        if self.sft_oracle_prob < 0:
            self.sft_oracle_prob = SFT_ORACLE_PROB[self.task]
        if self.sft_readout_steps < 0:
            self.sft_readout_steps = self.sft_steps // 2
        self.batch_size = self.num_envs * self.num_steps                      # B
        # --total-steps counts env steps over all workers (bad sizes are reported in parse_args)
        self.num_updates = max(self.total_steps // max(self.batch_size * WORLD, 1), 1)


# The action of an SFT answer is the oracle's with this probability. NumberLine and Blackjack start
# from random actions so RL has all the decision-making to learn; the points games need a policy that
# sometimes finishes a formula, or RL never sees a positive reward (the paper's SFT start: 23% on EZPoints).
SFT_ORACLE_PROB = {"numberline": 0.0, "ezpoints": 0.5, "points24": 0.5, "blackjack": 0.0}
# §2 of the paper (RL4VLM facts). Steps per update: 512 (NumberLine, Blackjack) or 1024 (points games).
PAPER_PRESET = dict(temperature=0.2, thought_coef=0.5, clip_coef=0.1, gamma=0.9, gae_lambda=0.95, update_epochs=4,
                    max_grad_norm=0.01, learning_rate=1e-5, lora_rank=128, lora_alpha=256.0, lora_dropout=0.05,
                    lora_targets="all-linear", minibatch_size=128, micro_batch_size=4, max_new_tokens=256,
                    total_steps=15000, num_envs=4, ent_coef=0.0, lora_in_sft=True, gradient_checkpointing=True,
                    value_input="last", kl_coef=0.0)


def fail(message):
    """Bad input: one line that says what to do, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    parser = HfArgumentParser(Args)

    def error(message):
        fail(f"{message} (see python rl4vlm_min.py --help)")

    parser.error = error
    argv = sys.argv[1:] if argv is None else list(argv)
    (args,) = parser.parse_args_into_dataclasses(argv)
    given = {a.lstrip("-").split("=")[0].replace("-", "_").replace("no_cot", "cot") for a in argv if a.startswith("--")}
    if args.resume:
        args = resumed_args(args, given)
    elif args.preset == "paper":    # the preset first, then any flag the user typed wins
        steps = 1024 if args.task in ("ezpoints", "points24") else 512
        for key, value in {**PAPER_PRESET, "num_steps": steps // PAPER_PRESET["num_envs"]}.items():
            if key not in given:
                setattr(args, key, value)
        args.__post_init__()
    checks = [(args.learning_rate > 0 and args.sft_lr > 0, "learning rates must be > 0"),
              (args.clip_coef > 0, "--clip-coef must be > 0"), (args.update_epochs > 0, "--update-epochs must be > 0"),
              (min(args.num_envs, args.num_steps, args.minibatch_size, args.micro_batch_size) > 0,
               "--num-envs, --num-steps, --minibatch-size and --micro-batch-size must be > 0"),
              (args.batch_size % args.minibatch_size == 0, f"--minibatch-size {args.minibatch_size} must divide the batch "
               f"num_envs*num_steps = {args.batch_size}"),
              (args.minibatch_size % args.micro_batch_size == 0, "--micro-batch-size must divide --minibatch-size"),
              (args.temperature > 0, "--temperature must be > 0"), (args.kl_coef >= 0, "--kl-coef must be >= 0"), (0 <= args.thought_coef <= 1, "--thought-coef must be in [0, 1]"),
              (0 <= args.sft_oracle_prob <= 1, "--sft-oracle-prob must be in [0, 1] (or -1 for the task default)"),
              (args.lora_rank >= 0 and args.max_new_tokens > 0 and args.eval_episodes > 0 and args.sft_steps >= 0,
               "--lora-rank, --sft-steps must be >= 0; --max-new-tokens, --eval-episodes > 0"),
              (args.total_steps >= args.batch_size * WORLD, f"--total-steps must be at least one batch of all "
               f"workers ({args.batch_size * WORLD})")]
    for ok, message in checks:
        if not ok:
            error(message)
    return args


RESUME_FIXED = ("task", "model", "num_envs", "num_steps", "lora_rank", "lora_targets")   # the saved state depends on these


def resumed_args(args, given):
    """--resume DIR: the run's own settings from its checkpoint. Flags typed now override them (e.g. a lower
    --learning-rate after a NaN), except those the saved state depends on."""
    meta_path = os.path.join(args.resume, "checkpoint", "meta.json")
    if not os.path.isfile(meta_path):
        fail(f"--resume {args.resume!r} holds no checkpoint ({meta_path} is missing); pass the --output-dir of a run "
             "that saved one (with --save-every K, or a finished run)")
    with open(meta_path) as f:
        saved = json.load(f)["args"]
    for key in RESUME_FIXED:
        if key in given and getattr(args, key) != saved[key]:
            fail(f"--resume {args.resume!r} holds a checkpoint made with --{key.replace('_', '-')} {saved[key]!r}, not "
                 f"{getattr(args, key)!r}; resume with the same value or start a new run in another --output-dir")
    typed = {key: getattr(args, key) for key in given if key in saved and key != "output_dir"}
    return Args(**{**saved, **typed, "output_dir": args.resume, "resume": args.resume})


# ---- PROMPTS: one single-turn prompt per step; what is in the image stays out of the text ----
GAME_RULES = {
    "numberline": "You are playing NumberLine. The image shows a target and a current number from 0 to 5; each move "
                  "adds or subtracts one. Reach the target.",
    "ezpoints": "You are playing EZPoints. The image shows two playing cards; J, Q and K count as 10. Write a formula "
                "that uses the number of each card once and equals 12, one number or operator per move, then choose = .",
    "points24": "You are playing Points24. The image shows four playing cards; A counts as 1 and J, Q and K as 10. "
                "Write a formula that uses the number of each card once and equals 24, one token per move, then choose = .",
    "blackjack": "You are playing Blackjack. The image shows the dealer's cards at the top, one face down, and your cards "
                 "below. An ace counts 1 or 11 and J, Q and K count 10. Get closer to 21 than the dealer without going over.",
}


def build_prompt(task, info, action_names, cot):
    """The user turn's text. Only the points games' formula is state given as text (it changes every step)."""
    legal = ", ".join(f'"{a}"' for a in action_names)
    text = f"{GAME_RULES[task]} Legal actions: {legal}."
    if task in ("ezpoints", "points24"):
        text += f' The formula so far: "{" ".join(info["Formula"])}".'
    if cot:
        return text + ' Answer in JSON, thoughts first: {"thoughts": "what you see and plan", "action": "a legal action"}'
    return text + ' Answer in JSON with the action only: {"action": "a legal action"}'


def chat_prompt(processor, text):
    """The model's own chat template with one image and the text: never a template string of one family."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def task_prompts(processor, task, infos, cot):
    """The chat-rendered prompt of each env's current state (one per info)."""
    return [chat_prompt(processor, build_prompt(task, info, envs.TASKS[task].action_names, cot)) for info in infos]


def thought_text(task, info):
    """What the thoughts should read out of the image (the SFT target, and the read-out accuracy check).
    NumberLine's thoughts end with the comparison the paper's prompt asks to think through before acting."""
    if task == "numberline":
        side = "higher" if info["Target"] > info["Current"] else "lower"
        return f"current is {info['Current']}, target is {info['Target']}, the target is {side}"
    if task in ("ezpoints", "points24"):
        return "numbers are " + ", ".join(str(n) for n in info["Numbers"])
    return f"my total is {info['Player Total']}, dealer shows {info['Dealer Total']}"


def answer_text(task, info, action_name, cot):
    """A well-formed answer: thoughts first, action last (the paper's format)."""
    if cot:
        return f'{{"thoughts": "{thought_text(task, info)}", "action": "{action_name}"}}'
    return f'{{"action": "{action_name}"}}'


# ---- PARSER: text -> legal action (random legal action if none or several are named) ----
ACTION_KEY = '"action":'


def parse_action(text, action_names, rng=None):
    """(index, parsed). Reads the text after the last "action": key (lower-cased). Exactly one legal action
    named there, as a whole token ("10" never counts as "1"), gives parsed=True; else a uniformly random
    legal action from `rng` and parsed=False. Never raises."""
    text = str(text).lower()
    start = text.rfind(ACTION_KEY)
    if start >= 0:
        tail = text[start + len(ACTION_KEY):]
        named = [i for i, name in enumerate(action_names)
                 if re.search(rf"(?<![0-9a-z]){re.escape(name.lower())}(?![0-9a-z])", tail)]
        if len(named) == 1:
            return named[0], True
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.integers(len(action_names))), False


# ---- MODEL: the embedded tiny LLaVA, loading, LoRA, value head, and the one scoring function ----
TINY_TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
TINY_SPLIT = r" ?[A-Za-z]+| ?\d+| ?[^\w\s]|\s"     # word-level pieces; a leading space sticks to what follows


def tiny_corpus():
    """Every text the tiny model must tokenize: prompts and answers of random states, the chat template's words."""
    texts, rng = ["USER: ASSISTANT: \n", " ".join(str(i) for i in range(40))], np.random.default_rng(0)
    for task, cls in envs.TASKS.items():
        env = cls()
        texts.append(" ".join(cls.action_names))        # every action after a space, as formulas write them
        for seed in range(100):
            _, info = env.reset(seed=seed)
            for _ in range(4):      # a few random moves: formulas and Blackjack totals of later steps
                for cot in (True, False):
                    texts.append(build_prompt(task, info, cls.action_names, cot))
                    texts += [answer_text(task, info, a, cot) for a in cls.action_names]
                _, _, term, trunc, info = env.step(int(rng.integers(len(cls.action_names))))
                if term or trunc:
                    break
    return "\n".join(texts)


TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   image_size=64, patch_size=16)


def build_tiny_model(path, seed):
    """A 0.5M-parameter LLaVA (CLIP-style tower + Llama-style LM) with a word-level tokenizer, saved to `path`
    with save_pretrained so that it is loaded back exactly like a real checkpoint. Same seed, same model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    words = sorted(set(re.findall(TINY_SPLIT, tiny_corpus())) | {chr(c) for c in range(32, 127)})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(TINY_SPLIT), behavior="isolated")
    tok.decoder = decoders.Fuse()           # decoding concatenates the pieces: text round-trips exactly
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side="left", extra_special_tokens={"image_token": "<image>"})
    # White maps to 0 (mean 1, std 0.5): with CLIP's usual mean/std the white background dominates every
    # patch and the tiny tower cannot tell the digits apart (measured while building this).
    px, patch = TINY_VISION["image_size"], TINY_VISION["patch_size"]
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px},
                                                      image_mean=[1.0] * 3, image_std=[0.5] * 3)
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=TINY_TEMPLATE)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**TINY_VISION),
        text_config=transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4, vocab_size=len(vocab),
                                             max_position_embeddings=1024, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_id=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 3
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# The only family-specific code: from_pretrained overrides that keep a 300x300 frame one bounded view (the
# paper's single 336-px view is 576 tokens) instead of tiling it, each derived from the checkpoint's own
# configuration (no pixel size of one checkpoint); and `mrope`: the model builds its own 3-D positions
# from the image grid (we must not pass 1-D position ids). Image tokens per frame: see the README.
def family_bounds(config, name, trust_remote_code):
    """(processor kwargs, model kwargs, mrope) for the checkpoint `name` with this config."""
    kind = config.model_type
    if kind in ("llava_next", "llava_onevision"):       # any-resolution tiling: allow one tile of the
        side = config.vision_config.image_size          # tower's own size (base view + 1 tile, not 4-36)
        return {"image_grid_pinpoints": [[side, side]]}, {"image_grid_pinpoints": [[side, side]]}, False
    if kind in ("qwen2_vl", "qwen2_5_vl"):              # never more pixels than the frame has
        size = transformers.AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code).size
        pixels = envs.SIZE * envs.SIZE
        return {"size": {"shortest_edge": min(size["shortest_edge"], pixels), "longest_edge": pixels}}, {}, True
    if kind in ("idefics3", "smolvlm"):                 # one resized crop, not a grid of crops
        return {"do_image_splitting": False}, {}, False
    return {}, {}, False                                # LLaVA-1.5 and others: one view as they are


TESTED_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm")


def load_model(name, device, dtype, trust_remote_code=False):
    """The same Auto calls for the tiny model and for real checkpoints, with the family's bounds applied."""
    try:
        config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        model_type, (processor_kw, model_kw, mrope) = config.model_type, family_bounds(config, name, trust_remote_code)
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code, **processor_kw)
        vlm = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                          **model_kw).to(device)
    except (OSError, ValueError) as e:
        fail(f"cannot load --model {name!r} as an image-text-to-text model ({str(e).splitlines()[0][:200]}); "
             "pass 'tiny', a local checkpoint directory or a Hugging Face id")
    if model_type not in TESTED_FAMILIES:
        print(f"note: model type {model_type!r} is not among the tested families {TESTED_FAMILIES}; trying it as is")
    if getattr(processor, "image_processor", None) is None or not hasattr(processor, "tokenizer"):
        fail(f"--model {name!r} has a processor that cannot take an image; pass an image-text-to-text checkpoint")
    if getattr(processor, "chat_template", None) is None:
        fail(f"--model {name!r} has no chat template; use a chat/instruct checkpoint or add one to its processor")
    processor.tokenizer.padding_side = "left"     # prompts are left-padded so that every answer starts at column P
    vlm.mrope = mrope
    # Sampling settings a checkpoint ships (a repetition penalty, top-k, ...) would make generate() sample from
    # another policy than the one Policy.score() scores: PPO silently off-policy. Keep only the token ids;
    # Policy.sampling_config() gives every sampling setting explicitly.
    tok = processor.tokenizer
    vlm.generation_config = transformers.GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                          pad_token_id=tok.pad_token_id)
    return processor, vlm


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A dropout(x). B starts at zero, so a fresh adapter changes nothing.
    A and B are kept in fp32 so that small updates are not lost in bf16."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        delta = self.dropout(x).float() @ self.lora_A.T @ self.lora_B.T          # (..., out)
        return self.base(x) + (self.scale * delta).to(x.dtype)

    def merged(self):
        """The base layer with B A folded into its weight (for saving a plain checkpoint)."""
        with torch.no_grad():
            self.base.weight += (self.scale * self.lora_B @ self.lora_A).to(self.base.weight.dtype)
        return self.base


def add_lora(vlm, rank, alpha, dropout, targets):
    """Freeze the VLM and wrap the target linear layers with LoRA. 'language': the LM's q/k/v/o and MLP
    projections (the LM is `language_model`, or `text_model` in Idefics3/SmolVLM); 'all-linear': every linear
    layer but the output head (LM, vision tower, projector: the paper)."""
    vlm.requires_grad_(False)
    head = vlm.get_output_embeddings()
    names = [n for n, m in vlm.named_modules() if isinstance(m, nn.Linear) and m is not head and
             (targets == "all-linear" or (("language_model" in n or "text_model" in n) and n.split(".")[-1] in
                                          ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))]
    assert names, "no linear layer matched --lora-targets; this model family is not supported yet"
    for name in names:
        parent, child = vlm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else vlm, name.rsplit(".", 1)[-1]
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return len(names)


def merge_lora(vlm):
    for name, module in list(vlm.named_modules()):
        if isinstance(module, LoRALinear):
            parent = vlm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else vlm
            setattr(parent, name.rsplit(".", 1)[-1], module.merged())


class Policy(nn.Module):
    """The VLM (actor) plus a value head (critic) on the VLM's final hidden states of the prompt (§1).
    value_input "last": the last prompt token, as in the paper; "mean": the mean over every prompt token."""

    def __init__(self, vlm, processor, temperature, thought_coef, value_input="last"):
        super().__init__()
        self.vlm, self.processor = vlm, processor
        self.temperature, self.thought_coef, self.value_input = temperature, thought_coef, value_input
        self.reference = None       # a frozen copy of the VLM when RL starts, if --kl-coef > 0 (start_rl)
        hidden = vlm.config.get_text_config().hidden_size
        device = vlm.get_output_embeddings().weight.device
        # the paper's MLP, kept in fp32 whatever the VLM's dtype
        self.value_head = nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(),
                                        nn.Linear(512, 1)).to(device)
        tok = processor.tokenizer
        self.eos_id, self.pad_id = tok.eos_token_id, tok.pad_token_id
        # the image token and padding can never be sampled; scoring masks them the same way
        self.banned = sorted({t for t in (vlm.config.image_token_id if hasattr(vlm.config, "image_token_id") else None,
                                          self.pad_id) if t is not None and t != self.eos_id})

    def device(self):
        return self.value_head[0].weight.device

    def encode_prompts(self, frames, prompts):
        """Frames + chat-rendered prompts -> a left-padded batch: input_ids (B, P), attention_mask (B, P), pixel_values..."""
        batch = self.processor(images=[[f] for f in frames], text=list(prompts), padding=True, return_tensors="pt")
        return {k: v.to(self.device()) for k, v in batch.items()}

    def sampling_config(self, greedy, max_new_tokens):
        """Every setting of generate(), explicit: plain sampling at self.temperature (or greedy), nothing that
        score() does not apply: no top-k, top-p, min-p, typical-p or repetition penalty, whatever the checkpoint."""
        sampling = dict(do_sample=False) if greedy else dict(
            do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0,
            eta_cutoff=0.0)
        return transformers.GenerationConfig(
            **sampling, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, num_beams=1,
            max_new_tokens=max_new_tokens, suppress_tokens=self.banned or None, pad_token_id=self.pad_id,
            eos_token_id=self.eos_id)

    def generate(self, frames, prompts, greedy, max_new_tokens):
        """One batched generate for all envs. Returns the answer token ids per env, each ending at EOS (included)."""
        batch = self.encode_prompts(frames, prompts)
        with torch.no_grad():
            seqs = self.vlm.generate(**batch, generation_config=self.sampling_config(greedy, max_new_tokens))
        answers = []
        for row in seqs[:, batch["input_ids"].shape[1]:].tolist():             # (B, A) -> lists
            answers.append(row[: row.index(self.eos_id) + 1] if self.eos_id in row else row)
        return answers

    def token_weights(self, answer_ids):
        """lambda for thought tokens, 1 for action tokens: the action span starts at the token that holds the
        first character of the last "action": key (character offsets of the decoded text, no token ids)."""
        decode = lambda ids: self.processor.tokenizer.decode(ids, skip_special_tokens=True)
        start = decode(answer_ids).lower().rfind(ACTION_KEY)
        weights = [self.thought_coef] * len(answer_ids)
        if start < 0:
            return weights              # no action key: the action was random, only thoughts were written
        lo, hi = 0, len(answer_ids) - 1     # first token whose decoded prefix reaches past `start`
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if len(decode(answer_ids[: mid + 1])) <= start else (lo, mid)
        return weights[:lo] + [1.0] * (len(answer_ids) - lo)

    def score(self, frames, prompts, answers, weights, temperature=None, reference=False):
        """The one scoring function (rollout, PPO update and SFT): returns
        logprob (B,) = sum_t w_t log softmax(logits_t / temperature)[answer_t], value (B,), entropy (B,) and the
        next-token log-probabilities logp (B, A, V). reference=True: under the frozen reference VLM (--kl-coef)."""
        temperature = temperature or self.temperature
        vlm = self.reference if reference else self.vlm
        batch = self.encode_prompts(frames, prompts)
        P, A = batch["input_ids"].shape[1], max(len(a) for a in answers)
        answer_ids = torch.full((len(answers), A), self.eos_id, dtype=torch.long)   # (B, A), right-padded
        answer_mask = torch.zeros(len(answers), A, dtype=torch.long)            # (B, A), 1 on real answer tokens
        w = torch.zeros(len(answers), A)                                        # (B, A), per-token weights
        for i, (ids, ws) in enumerate(zip(answers, weights)):
            answer_ids[i, : len(ids)], answer_mask[i, : len(ids)], w[i, : len(ws)] = torch.tensor(ids), 1, torch.tensor(ws)
        answer_ids, answer_mask, w = answer_ids.to(self.device()), answer_mask.to(self.device()), w.to(self.device())
        input_ids = torch.cat([batch.pop("input_ids"), answer_ids], 1)         # (B, T)
        attention_mask = torch.cat([batch.pop("attention_mask"), answer_mask], 1)   # (B, T)
        for key in ("mm_token_type_ids", "token_type_ids"):                    # per-token types: answers are text (0)
            if key in batch:
                batch[key] = torch.cat([batch[key], torch.zeros_like(answer_ids).to(batch[key].dtype)], 1)
        hidden = self.hidden_states(input_ids, attention_mask, batch, vlm)     # (B, T, H)
        logits = vlm.get_output_embeddings()(hidden[:, P - 1: -1]).float() / temperature   # (B, A, V)
        if self.banned:
            logits[..., self.banned] = -torch.inf
        logp = logits.log_softmax(-1)                                           # (B, A, V)
        token_logp = logp.gather(-1, answer_ids[..., None])[..., 0]             # (B, A)
        mask = answer_mask.float()
        entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)           # (B, A)
        value = self.state_value(hidden[:, :P], attention_mask[:, :P])          # (B,)
        entropy = (entropy * mask).sum(-1) / mask.sum(-1).clamp(min=1)         # (B,)
        return (token_logp * w).sum(-1), value, entropy, logp

    def hidden_states(self, input_ids, attention_mask, extra, vlm=None):
        """The VLM trunk's final hidden states (B, T, H); positions count real tokens only, as generate() does
        (M-RoPE models build their 3-D positions from the image grid themselves)."""
        vlm = self.vlm if vlm is None else vlm
        position_ids = None if vlm.mrope else (attention_mask.cumsum(-1) - 1).clamp(min=0)   # (B, T)
        return vlm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, **extra).last_hidden_state

    def state_value(self, hidden, prompt_mask):
        """V(s) from the prompt's final hidden states (B, P, H), never from the answer: the critic's input is
        the state alone. A 7B model carries the state into its last prompt token (the paper's choice); the tiny
        model does not (that position precedes the same '{"' in every answer, so SFT gives it no reason to),
        and its last-token value head gave 0.78-0.81 for all 30 NumberLine states. "mean" reads the mean over
        the prompt tokens, image tokens included, detached: the value loss trains the head only, since when
        it also trained the trunk the thoughts' read-out fell to 0.56-0.82 after RL (results/EXPERIMENTS.md)."""
        if self.value_input == "last":
            features = hidden[:, -1]                                            # (B, H): left padding
        else:
            m = prompt_mask[..., None].to(hidden.dtype)                         # (B, P, 1)
            features = ((hidden * m).sum(1) / m.sum(1)).detach()                # (B, H)
        return self.value_head(features.float())[:, 0]                          # (B,)

    def value(self, frames, prompts):
        """V(s) alone (for bootstrapping the last step of a rollout)."""
        batch = self.encode_prompts(frames, prompts)
        with torch.no_grad():
            mask = batch.pop("attention_mask")
            hidden = self.hidden_states(batch.pop("input_ids"), mask, batch)  # (B, P, H)
            return self.state_value(hidden, mask)


# ---- ROLLOUT: N envs step together; one batched generate per step ----
@dataclass
class Sample:
    """One env step as the update needs it: scored again later with its own frame and prompt (§5's defect)."""
    frame: np.ndarray               # (300, 300, 3) uint8
    prompt: str                     # the chat-rendered prompt of this very step
    answer: list                    # answer token ids, EOS included
    weights: list                   # lambda on thought tokens, 1 on action tokens


def act(policy, task, infos, frames, args, rng, greedy=False):
    """Observe -> prompt -> one batched generate -> parse. Returns actions, parsed flags, prompts, answers, texts."""
    names = envs.TASKS[task].action_names
    prompts = task_prompts(policy.processor, task, infos, args.cot)
    answers = policy.generate(frames, prompts, greedy, args.max_new_tokens)
    texts = [policy.processor.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    parsed = [parse_action(text, names, rng) for text in texts]
    return [a for a, _ in parsed], [ok for _, ok in parsed], prompts, answers, texts


def rollout(policy, vec, args, rng, episodes, update=0):
    """S steps of N envs with the current policy (eval mode, no grad). `vec` holds the envs and their current
    obs/infos across updates; finished episodes are appended to `episodes` as (summed reward, length)."""
    S, N = args.num_steps, args.num_envs
    logprobs, values, rewards, dones = (torch.zeros(S, N) for _ in range(4))     # (S, N) each
    samples, counts, gallery = [], dict(parse_fail=0, readout_ok=0), []
    policy.eval()                   # LoRA dropout off while sampling
    for t in range(S):
        actions, parsed, prompts, answers, texts = act(policy, args.task, vec["infos"], vec["obs"], args, rng)
        weights = [policy.token_weights(a) for a in answers]
        with torch.no_grad():
            logprob, value, _, _ = policy.score(vec["obs"], prompts, answers, weights)
        check_finite("the rollout log-probability", logprob, f"update {update}, rollout step {t}")
        check_finite("the rollout value", value, f"update {update}, rollout step {t}")
        logprobs[t], values[t] = logprob.cpu(), value.cpu()
        counts["parse_fail"] += parsed.count(False)
        counts["readout_ok"] += sum(thought_text(args.task, info) in text for info, text in zip(vec["infos"], texts))
        gallery.append(dict(info=vec["infos"][0], answer=texts[0], action=envs.TASKS[args.task].action_names[actions[0]],
                            parsed=parsed[0]))
        for i, env in enumerate(vec["envs"]):
            samples.append(Sample(vec["obs"][i], prompts[i], answers[i], weights[i]))
            obs, reward, terminated, truncated, info = env.step(actions[i])
            rewards[t, i] = reward
            vec["ep_return"][i] += reward
            vec["ep_len"][i] += 1
            if terminated or truncated:     # truncation is a loss under these games' rules: no bootstrap
                dones[t, i] = 1.0
                episodes.append((vec["ep_return"][i], vec["ep_len"][i]))
                vec["ep_return"][i], vec["ep_len"][i] = 0.0, 0
                obs, info = env.reset()     # the env's own generator continues: no reseeding
            vec["obs"][i], vec["infos"][i] = obs, info
    next_prompts = task_prompts(policy.processor, args.task, vec["infos"], args.cot)
    next_value = policy.value(vec["obs"], next_prompts).cpu()                 # (N,) bootstrap V(s_S)
    return dict(samples=samples, logprobs=logprobs, values=values, rewards=rewards, dones=dones, next_value=next_value,
                format_error_rate=counts["parse_fail"] / (S * N), readout_acc=counts["readout_ok"] / (S * N),
                gallery=gallery[:3])


# ---- GAE ----
def compute_gae(rewards, values, dones, next_value, gamma, gae_lambda):
    """Generalized advantage estimation. rewards, values, dones: (S, N); dones[t] = 1 when the episode ended
    with step t (so step t+1 belongs to a new episode); next_value: (N,) = V(s_S). Returns advantages, returns."""
    S = rewards.shape[0]
    advantages = torch.zeros_like(rewards)                                     # (S, N)
    lastgaelam = torch.zeros_like(next_value)                                  # (N,)
    for t in reversed(range(S)):
        next_values = next_value if t == S - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_values * nonterminal - values[t]
        lastgaelam = delta + gamma * gae_lambda * nonterminal * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values


# ---- PPO UPDATE: clipped surrogate, clipped value loss, minibatches with gradient accumulation ----
def check_finite(name, tensor, where):
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(f"{name} is NaN or inf at {where}: stopping, the last checkpoint is kept; continue "
                                 "from it with --resume OUTPUT_DIR and a lower --learning-rate or --max-grad-norm")


def reference_kl(logp, ref_logp, lengths):
    """KL(pi || pi_ref) over the whole vocabulary at every answer position, averaged over each answer's tokens
    and then over the batch. logp, ref_logp: (B, A, V). Exact, not a sampled estimate: it also charges the
    probability the policy moves onto tokens it did not sample (a broken answer's), and it is 0 when
    pi = pi_ref. Banned tokens (-inf in both) add nothing."""
    mask = torch.zeros(logp.shape[:2], device=logp.device)                     # (B, A)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    allowed = torch.isfinite(logp)                                              # (B, A, V)
    logp, ref_logp = logp.masked_fill(~allowed, 0.0), ref_logp.masked_fill(~allowed, 0.0)   # no inf - inf
    kl = (logp.exp() * allowed * (logp - ref_logp)).sum(-1)                     # (B, A)
    return ((kl * mask).sum(-1) / mask.sum(-1)).mean()


def ppo_update(policy, optimizer, data, advantages, returns, args, generator, update):
    b_samples = data["samples"]                                                # B samples, t-major like .reshape(-1)
    b_logprobs, b_values = data["logprobs"].reshape(-1), data["values"].reshape(-1)   # (B,)
    b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)      # (B,)
    params = [p for p in policy.parameters() if p.requires_grad]
    stats = dict(pg_loss=[], v_loss=[], entropy=[], kl_ref=[], approx_kl=[], clipfrac=[], grad_norm=[])
    first_ratio = None
    policy.train()
    for epoch in range(args.update_epochs):
        b_inds = torch.randperm(args.batch_size, generator=generator)
        for start in range(0, args.batch_size, args.minibatch_size):
            mb_inds = b_inds[start: start + args.minibatch_size]
            mb_advantages = b_advantages[mb_inds]
            if len(mb_inds) > 1:            # per-minibatch normalisation (a minibatch of 1 has no spread)
                mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
            optimizer.zero_grad()
            for micro in range(0, args.minibatch_size, args.micro_batch_size):   # gradient accumulation
                inds = mb_inds[micro: micro + args.micro_batch_size]
                batch = [b_samples[i] for i in inds]
                inputs = ([s.frame for s in batch], [s.prompt for s in batch], [s.answer for s in batch],
                          [s.weights for s in batch])
                newlogprob, newvalue, entropy, newlogp = policy.score(*inputs)
                newlogprob, newvalue, entropy = newlogprob.cpu(), newvalue.cpu(), entropy.cpu()
                check_finite("the log-probability", newlogprob, f"update {update}, epoch {epoch}")
                check_finite("the value", newvalue, f"update {update}, epoch {epoch}")
                logratio = newlogprob - b_logprobs[inds]
                ratio = logratio.exp()
                if first_ratio is None:
                    first_ratio = ratio.detach()      # == 1 by construction: same scoring path, same weights
                with torch.no_grad():
                    stats["approx_kl"].append(((ratio - 1) - logratio).mean().item())   # the k3 estimator
                    stats["clipfrac"].append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())
                adv = mb_advantages[micro: micro + args.micro_batch_size]
                pg_loss1 = -adv * ratio
                pg_loss2 = -adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()
                v_loss_unclipped = (newvalue - b_returns[inds]) ** 2
                v_clipped = b_values[inds] + torch.clamp(newvalue - b_values[inds], -args.clip_coef, args.clip_coef)
                v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - b_returns[inds]) ** 2).mean()
                kl_ref = torch.zeros(())
                if policy.reference is not None:          # --kl-coef: stay near the SFT policy
                    with torch.no_grad():
                        ref_logp = policy.score(*inputs, reference=True)[3]
                    kl_ref = reference_kl(newlogp, ref_logp, [len(s.answer) for s in batch]).cpu()
                loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss + args.kl_coef * kl_ref
                check_finite("the PPO loss", loss, f"update {update}, epoch {epoch}")
                (loss * len(inds) / args.minibatch_size).backward()
                for key, val in (("pg_loss", pg_loss), ("v_loss", v_loss), ("entropy", entropy.mean()),
                                 ("kl_ref", kl_ref)):
                    stats[key].append(val.item())
            average_gradients(params)       # data parallel: the mean over workers (nothing without torchrun)
            grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            check_finite("the gradient norm", grad_norm, f"update {update}, epoch {epoch}")
            stats["grad_norm"].append(grad_norm.item())
            optimizer.step()
    y_pred, y_true = b_values.numpy(), b_returns.numpy()
    var_y = np.var(y_true)
    out = {k: float(np.mean(v)) for k, v in stats.items()}
    out["explained_var"] = float("nan") if var_y == 0 else float(1 - np.var(y_true - y_pred) / var_y)
    out["first_ratio_dev"] = float((first_ratio - 1).abs().max())
    return out


# ---- SFT WARM START: cross-entropy on answers written from the env oracle ----
def sft_answers(task, env, rng, n, oracle_prob, cot, tokenizer, readout_only=False):
    """n (frame, info, answer ids) from random states (a reset, then 0-3 oracle moves). The thoughts read the state
    out correctly; the action is the oracle's with probability `oracle_prob`, else uniformly random."""
    names, out = env.action_names, []
    for _ in range(n):
        obs, info = env.reset(seed=int(rng.integers(2**31)))
        for _ in range(int(rng.integers(4))):
            next_obs, _, terminated, truncated, next_info = env.step(env.oracle())
            if terminated or truncated:
                break
            obs, info = next_obs, next_info
        action = env.oracle() if rng.random() < oracle_prob else int(rng.integers(len(names)))
        text = thought_text(task, info) if readout_only else answer_text(task, info, names[action], cot)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        out.append((obs, info, ids + [tokenizer.eos_token_id]))
    return out


def sft_warm_start(policy, args, rng):
    env, tok = envs.TASKS[args.task](), policy.processor.tokenizer
    params = set_trainable(policy, args, "sft")
    optimizer = torch.optim.Adam(params, lr=args.sft_lr)
    # 16 states of its own for the read-out check (not the batch just trained on), from a generator of its own
    check = sft_answers(args.task, env, np.random.default_rng(args.seed + 10**6), 16, 0.0, args.cot, tok)
    check_prompts = task_prompts(policy.processor, args.task, [info for _, info, _ in check], args.cot)
    policy.train()
    for step in range(1, args.sft_steps + 1):
        data = sft_answers(args.task, env, rng, args.sft_batch_size, args.sft_oracle_prob, args.cot, tok,
                           readout_only=step <= args.sft_readout_steps)
        prompts = task_prompts(policy.processor, args.task, [info for _, info, _ in data], args.cot)
        answers = [ids for _, _, ids in data]
        n_tokens, loss = sum(len(a) for a in answers), 0.0
        optimizer.zero_grad()
        for lo in range(0, len(data), args.micro_batch_size):                 # gradient accumulation
            part = slice(lo, lo + args.micro_batch_size)
            logprob, _, _, _ = policy.score([f for f, _, _ in data[part]], prompts[part], answers[part],
                                         [[1.0] * len(a) for a in answers[part]], temperature=1.0)
            part_loss = -logprob.sum() / n_tokens                                 # mean cross-entropy per answer token
            check_finite("the SFT loss", part_loss, f"SFT step {step}")
            part_loss.backward()
            loss += part_loss.item()
        average_gradients(params)
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.sft_steps:       # read-out accuracy: can the model see yet?
            policy.eval()                                   # dropout off, as when the model plays
            texts = [tok.decode(a, skip_special_tokens=True) for a in
                     policy.generate([f for f, _, _ in check], check_prompts, True, args.max_new_tokens)]
            readout = np.mean([thought_text(args.task, info) in t for (_, info, _), t in zip(check, texts)])
            print(f"sft step {step:4d}/{args.sft_steps} | loss {loss:.3f} | read-out (greedy) {readout:.2f}", flush=True)
            policy.train()


# ---- EVALUATION: fixed seeds disjoint from training; success = summed reward > 0 (the paper's metric) ----
EVAL_SEED = 10**6                   # eval episodes use seeds 10**6, 10**6 + 1, ...; training envs use seed * 1000 + i


def evaluate(policy, args, greedy, rng):
    """Success rate, mean return, format-error rate and read-out accuracy over args.eval_episodes episodes."""
    seeds = list(range(EVAL_SEED, EVAL_SEED + args.eval_episodes))
    returns, steps, fails, readouts = [], 0, 0, 0
    policy.eval()
    chunk = 4 * args.num_envs       # episodes played together in one batched generate
    for lo in range(0, len(seeds), chunk):
        group = [envs.TASKS[args.task]() for _ in seeds[lo: lo + chunk]]
        state = [list(env.reset(seed=s)) + [0.0, False] for env, s in zip(group, seeds[lo: lo + chunk])]
        while not all(done for *_, done in state):
            live = [i for i, (*_, done) in enumerate(state) if not done]
            actions, parsed, _, _, texts = act(policy, args.task, [state[i][1] for i in live], [state[i][0] for i in live],
                                               args, rng, greedy)
            for i, action, ok, text in zip(live, actions, parsed, texts):
                steps, fails = steps + 1, fails + (not ok)
                readouts += thought_text(args.task, state[i][1]) in text
                obs, reward, terminated, truncated, info = group[i].step(action)
                state[i] = [obs, info, state[i][2] + reward, terminated or truncated]
        returns += [total for _, _, total, _ in state]
    return dict(success=float(np.mean([r > 0 for r in returns])), mean_return=float(np.mean(returns)),
                format_error_rate=fails / steps, readout_acc=readouts / steps)


def baseline_success(task, episodes, kind, seed):
    """The random and oracle policies on the same eval seeds."""
    rng, wins = np.random.default_rng(seed), 0
    for s in range(EVAL_SEED, EVAL_SEED + episodes):
        env = envs.TASKS[task]()
        env.reset(seed=s)
        total, done = 0.0, False
        while not done:
            action = env.oracle() if kind == "oracle" else int(rng.integers(env.action_space.n))
            _, reward, terminated, truncated, _ = env.step(action)
            total, done = total + reward, terminated or truncated
        wins += total > 0
    return wins / episodes


# ---- DATA PARALLEL (torchrun): own envs and seeds per worker, averaged gradients, identical weights ----
def start_workers(device):
    if WORLD > 1 and not dist.is_initialized():
        import datetime             # rank 0 evaluates alone while the others wait: allow a long wait
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))


def average_gradients(params):
    """After each worker's backward: every worker holds the mean of all workers' gradients, so every worker
    takes the same optimizer step and the weights stay identical (what DistributedDataParallel does)."""
    if WORLD == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)             # sum over workers
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


def weights_digest(policy):
    import hashlib
    return hashlib.sha1(b"".join(t.numpy().tobytes() for t in trainable_state(policy).values())).hexdigest()


# ---- CHECKPOINTS: trainable weights and value head in safetensors, written to a temp dir then renamed ----
def trainable_state(policy):
    return {name: p.detach().contiguous().cpu() for name, p in policy.named_parameters() if p.requires_grad}


def worker_state(rng, generator, vec, episodes):
    """What one worker needs, besides the weights and the optimizer, to continue exactly: every RNG, the envs."""
    return {"torch_rng": torch.get_rng_state(), "generator": generator.get_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy_rng": rng.bit_generator.state, "python_rng": random.getstate(),
            "envs": [env.get_state() for env in vec["envs"]], "ep_return": vec["ep_return"], "ep_len": vec["ep_len"],
            "episodes": episodes}


def reference_adapters(policy):
    return {n: p.contiguous().cpu() for n, p in policy.reference.named_parameters() if ".lora_" in n}


def save_checkpoint(policy, state, meta, output_dir):
    """Write everything to a fresh temp dir, then swap it in with renames: a crash at any point leaves
    the previous checkpoint whole (as `checkpoint/` or, between the two renames, `checkpoint.old/`)."""
    from safetensors.torch import save_file
    final = os.path.join(output_dir, "checkpoint")
    tmp = tempfile.mkdtemp(prefix=".checkpoint-", dir=output_dir)
    try:
        save_file(trainable_state(policy), os.path.join(tmp, "policy.safetensors"))
        if policy.reference is not None:    # the KL reference's adapters, if any (its base is sft_model/ or --model)
            save_file(reference_adapters(policy), os.path.join(tmp, "reference.safetensors"))
        torch.save(state, os.path.join(tmp, "state.pt"))       # tensors and plain data only: loaded with weights_only
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    except BaseException:
        shutil.rmtree(tmp)              # a half-written temp dir is removed; the old checkpoint is untouched
        raise
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    if os.path.exists(final + ".old"):
        shutil.rmtree(final + ".old")


def restore_checkpoint(policy, optimizer, vec, args, rng, generator):
    """--resume: put back what save_checkpoint wrote. Returns (next update, episodes so far, metrics so far)."""
    from safetensors.torch import load_file
    ckpt = os.path.join(args.output_dir, "checkpoint")
    weights = load_file(os.path.join(ckpt, "policy.safetensors"))
    if set(weights) != set(trainable_state(policy)):
        fail(f"the checkpoint in {ckpt} does not match this model's trainable parameters; start a new run")
    policy.load_state_dict(weights, strict=False)
    if policy.reference is not None:
        policy.reference.load_state_dict(load_file(os.path.join(ckpt, "reference.safetensors")), strict=False)
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)      # never unpickles code
    if len(state["workers"]) != WORLD:
        fail(f"the checkpoint in {ckpt} was written by {len(state['workers'])} worker(s), this run has {WORLD}; "
             f"resume with torchrun --nproc_per_node {len(state['workers'])} (or without torchrun if 1)")
    optimizer.load_state_dict(state["optimizer"])
    state = state["workers"][RANK]
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    generator.set_state(state["generator"])
    rng.bit_generator.state = state["numpy_rng"]
    random.setstate(state["python_rng"])
    for env, env_state in zip(vec["envs"], state["envs"]):
        env.set_state(env_state)
    vec["obs"], vec["infos"] = (list(x) for x in zip(*(env.obs() for env in vec["envs"])))
    vec["ep_return"], vec["ep_len"] = list(state["ep_return"]), list(state["ep_len"])
    with open(os.path.join(ckpt, "meta.json")) as f:
        done = json.load(f)["update"]
    history = []
    if RANK == 0:                   # rank 0 alone keeps the metrics
        with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f][:done]          # rows after the checkpoint are redone
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in history)
    print(f"resumed {args.output_dir} after update {done}/{args.num_updates}", flush=True)
    return done + 1, list(state["episodes"]), history


def save_final_model(policy, path):
    """LoRA merged into the weights, saved as a plain checkpoint (loadable with --model path) + the value head."""
    from safetensors.torch import save_file
    merge_lora(policy.vlm)
    policy.vlm.save_pretrained(path)
    policy.processor.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in policy.value_head.state_dict().items()}, os.path.join(path, "value_head.safetensors"))


def plot_curve(history, path, title, levels):
    """Success over env steps with the SFT-only, random and oracle levels (`levels`: name -> success), and
    beside it what a student watches: format errors, read-out, approx_kl, kl_ref and explained variance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [h["env_steps"] for h in history]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax.plot(steps, [h["success"] for h in history], marker="o", ms=3, label="success (last 100 episodes)")
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


# ---- ONE GPU: how big is the prompt, will training fit, and --dry-run ----
def prompt_shape(policy, args):
    """(prompt tokens, image tokens) of the task's first prompt: the longest part of every sequence."""
    obs, info = envs.TASKS[args.task]().reset(seed=0)
    ids = policy.encode_prompts([obs], task_prompts(policy.processor, args.task, [info], args.cot))["input_ids"][0]
    return len(ids), int((ids == policy.vlm.config.image_token_id).sum())


def memory_estimate(policy, args, batch):
    """Rough training memory in bytes for `batch` sequences per forward/backward. Weights as loaded; gradients
    and Adam's two moments of the trainable parameters; activations of the language model after Korthikanti
    et al. 2022 (about 34 bytes per token per hidden unit per layer in 16-bit, or 2 with gradient
    checkpointing plus one layer recomputed), and of the vision tower if it trains (its tokens counted as the
    image tokens); the fp32 logits of the answer tokens; the rollout's KV cache."""
    text, vision = policy.vlm.config.get_text_config(), getattr(policy.vlm.config, "vision_config", None)
    elem = next(policy.vlm.parameters()).element_size()          # 2 in bf16, 4 in fp32
    trainable = sum(p.numel() * p.element_size() for p in policy.parameters() if p.requires_grad)
    prompt_tokens, image_tokens = prompt_shape(policy, args)
    seq, h, layers = prompt_tokens + args.max_new_tokens, text.hidden_size, text.num_hidden_layers
    keep = (lambda n: 1 + (n - 1) * 2 / 34) if args.gradient_checkpointing else (lambda n: n)   # layers' worth kept
    activations = batch * 34 * seq * h * elem / 2 * keep(layers)
    if vision is not None and any(p.requires_grad for n, p in policy.vlm.named_parameters() if "vision" in n):
        h_v = getattr(vision, "embed_dim", None) or vision.hidden_size
        activations += batch * 34 * image_tokens * h_v * elem / 2 * keep(getattr(vision, "num_hidden_layers", None) or vision.depth)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    est = {"weights": sum(p.numel() * p.element_size() for p in policy.parameters()),
           "gradients": trainable, "adam state": 2 * trainable,
           "activations": activations,
           "logits (fp32)": 3 * batch * args.max_new_tokens * text.vocab_size * 4,
           "KV cache (rollout)": args.num_envs * seq * layers * 2 * kv_heads * head_dim * elem}
    return {k: int(v) for k, v in est.items()}


def print_memory(policy, args, phase, batch):
    est = memory_estimate(policy, args, batch)
    total = sum(est.values())
    size = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
    parts = ", ".join(f"{k} {size(v)}" for k, v in est.items())
    print(f"memory estimate for {phase}: {parts} | total {size(total)}", end="", flush=True)
    if torch.cuda.is_available():
        free, capacity = torch.cuda.mem_get_info()
        print(f" | this GPU: {capacity / 2**30:.1f} GiB, {free / 2**30:.1f} free: " + ("fits" if total < free else
              "may not fit: lower --micro-batch-size or --num-envs, or add --gradient-checkpointing / --lora-in-sft"), end="")
    print(flush=True)
    return est


def dry_run(policy, args, rng, generator):
    """One rollout step of N envs and one PPO minibatch: measured time and peak memory, then exit."""
    import resource
    args = dataclasses.replace(args, num_steps=1, update_epochs=1, total_steps=args.num_envs, minibatch_size=args.num_envs,
                               micro_batch_size=math.gcd(args.micro_batch_size, args.num_envs))
    optimizer = start_rl(policy, args)
    print_memory(policy, args, "RL", args.micro_batch_size)
    vec = dict(envs=[envs.TASKS[args.task]() for _ in range(args.num_envs)], ep_return=[0.0] * args.num_envs,
               ep_len=[0] * args.num_envs)
    vec["obs"], vec["infos"] = (list(x) for x in zip(*(env.reset(seed=i) for i, env in enumerate(vec["envs"]))))
    t0 = time.time()
    data = rollout(policy, vec, args, rng, [], update=1)
    t1 = time.time()
    advantages, returns = compute_gae(data["rewards"], data["values"], data["dones"], data["next_value"], args.gamma, args.gae_lambda)
    stats = ppo_update(policy, optimizer, data, advantages, returns, args, generator, update=1)
    t2 = time.time()
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)      # Linux reports KiB
    print(f"dry run: rollout step of {args.num_envs} envs {t1 - t0:.2f} s | PPO update of {args.num_envs} samples "
          f"{t2 - t1:.2f} s | peak memory {peak / 2**30:.2f} GiB ({'GPU' if torch.cuda.is_available() else 'process RSS'}) | "
          f"first ratio - 1 = {stats['first_ratio_dev']:.1e}", flush=True)
    return dict(rollout_seconds=t1 - t0, update_seconds=t2 - t1, peak_bytes=peak, **stats)


# ---- TRAIN: SFT warm start, evaluate, PPO, evaluate again ----
def setup(args):
    """Seeds, device, workers, output dir, model and policy. Returns policy, rng (numpy), generator (torch)."""
    seed = args.seed + RANK                                # each worker samples differently (rank 0: --seed)
    random.seed(seed)                                      # the one seeding block
    np.random.seed(seed)
    torch.manual_seed(seed)                                # weights of new layers, sampling in generate
    rng = np.random.default_rng(seed)                      # parser fallback, SFT data, baselines
    generator = torch.Generator().manual_seed(seed)        # minibatch shuffling
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    start_workers(device)
    sft_model = os.path.join(args.output_dir, "sft_model")     # a resumed run's frozen base or KL reference
    if args.resume and os.path.isdir(sft_model):
        model_path = sft_model
    elif args.model == "tiny":
        model_path = os.path.join(args.output_dir, "tiny_model")
    else:
        model_path = args.model
    if RANK == 0:                   # rank 0 alone writes the output dir
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "metrics.jsonl"), "a" if args.resume else "w"):
                pass
        except OSError as e:
            fail(f"cannot write --output-dir {args.output_dir!r} ({e.strerror}); choose a writable directory")
        if args.model == "tiny" and model_path != sft_model:
            build_tiny_model(model_path, args.seed)
    if WORLD > 1:
        dist.barrier()              # the others wait for the tiny model to be written
    processor, vlm = load_model(model_path, device, dtype, args.trust_remote_code)
    if args.gradient_checkpointing:
        vlm.activation_checkpointing_enable()       # every decoder layer recomputed in the backward pass
    policy = Policy(vlm, processor, args.temperature, args.thought_coef, args.value_input)
    broadcast_weights(policy)       # the value head starts the same on every worker
    n_params = sum(p.numel() for p in policy.parameters())
    prompt_tokens, image_tokens = prompt_shape(policy, args)
    print(f"task {args.task} | model {args.model} ({type(vlm).__name__}, {n_params / 1e6:.2f}M params) | {device} {dtype} | "
          f"prompt {prompt_tokens} tokens ({image_tokens} image) | {args.num_updates} updates x {args.batch_size} steps x {WORLD} "
          f"worker(s)", flush=True)
    return policy, rng, generator


def set_trainable(policy, args, phase):
    """The one place that decides what trains, called at the start of SFT ("sft") and of RL ("rl") by train()
    and by the notebook alike. --lora-rank 0: every weight, in both phases. --lora-in-sft: LoRA adapters added
    before SFT, and only they (and the value head) train in both phases. --lora-rank R without it: SFT trains
    every weight, the adapters are added before RL. Returns the parameters that train."""
    lora_now = args.lora_rank > 0 and (phase == "rl" or args.lora_in_sft)
    if lora_now and not any(isinstance(m, LoRALinear) for m in policy.vlm.modules()):
        add_lora(policy.vlm, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
        broadcast_weights(policy)       # data parallel: every worker starts from rank 0's adapters
    if phase == "rl":
        # The rollout scores old log-probs and values with dropout off (eval mode); the update must score them
        # with the same function, or the first minibatch's ratio is not 1 (TRL's PPO turns dropout off too).
        for m in policy.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            if isinstance(getattr(m, "attention_dropout", None), float):
                m.attention_dropout = 0.0
    module = policy if phase == "rl" else policy.vlm           # the value head trains in RL only
    params = [p for p in module.parameters() if p.requires_grad]
    where = {}
    for name, m in policy.vlm.named_modules():
        if isinstance(m, LoRALinear):
            part = ".".join(n for n in name.split(".")[:2] if n != "model")
            where[part] = where.get(part, 0) + 1
    adapters = ", ".join(f"{n} in {part}" for part, n in where.items())
    print(f"{phase.upper()} trains {sum(p.numel() for p in params):,} parameters"
          + (f" (value head included)" if phase == "rl" else "")
          + (f": LoRA rank {args.lora_rank} adapters on {sum(where.values())} linear layers ({adapters}), the rest "
             "of the VLM frozen" if where else ": every weight of the VLM"), flush=True)
    return params


def start_rl(policy, args):
    """What trains in RL (set_trainable), the KL reference (a frozen copy of the model as RL starts: the SFT
    policy) if --kl-coef > 0, and the optimizer."""
    params = set_trainable(policy, args, "rl")
    if args.kl_coef > 0 and policy.reference is None:
        policy.reference = copy.deepcopy(policy.vlm).requires_grad_(False)
    return torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5)


def ppo_loop(policy, optimizer, args, rng, generator):
    """args.num_updates x (rollout, GAE, PPO update). Returns the per-update metrics (also in metrics.jsonl)."""
    vec = dict(envs=[envs.TASKS[args.task]() for _ in range(args.num_envs)], ep_return=[0.0] * args.num_envs,
               ep_len=[0] * args.num_envs)
    first = [env.reset(seed=args.seed * 1000 + RANK * args.num_envs + i) for i, env in enumerate(vec["envs"])]
    vec["obs"], vec["infos"] = [o for o, _ in first], [i for _, i in first]
    first_update, episodes, history = 1, [], []
    if args.resume:
        first_update, episodes, history = restore_checkpoint(policy, optimizer, vec, args, rng, generator)
    for update in range(first_update, args.num_updates + 1):
        t_update = time.time()
        lr = 0.5 * args.learning_rate * (1 + math.cos(math.pi * (update - 1) / args.num_updates))   # cosine to 0
        for group in optimizer.param_groups:
            group["lr"] = lr
        data = rollout(policy, vec, args, rng, episodes, update)
        env_steps = update * args.batch_size * WORLD
        advantages, returns = compute_gae(data["rewards"], data["values"], data["dones"], data["next_value"],
                                          args.gamma, args.gae_lambda)
        stats = ppo_update(policy, optimizer, data, advantages, returns, args, generator, update)
        # metrics over all workers: their last 100 episodes each, and the mean of each worker's rates and losses
        recent = [ep for worker in gather(episodes[-100:]) for ep in worker]
        local = dict(format_error_rate=data["format_error_rate"], readout_acc=data["readout_acc"], **stats)
        merged = {key: float(np.mean([worker[key] for worker in gather(local)])) for key in local}
        row = dict(update=update, env_steps=env_steps, lr=lr, episodes=sum(gather(len(episodes))),
                   success=float(np.mean([r > 0 for r, _ in recent])) if recent else float("nan"),
                   mean_return=float(np.mean([r for r, _ in recent])) if recent else float("nan"), **merged,
                   steps_per_second=args.batch_size * WORLD / (time.time() - t_update), samples=data["gallery"])
        if WORLD > 1:               # the point of averaging gradients: check it every update
            row["weight_digests"] = gather(weights_digest(policy))
            if len(set(row["weight_digests"])) != 1:
                raise RuntimeError(f"the workers' weights differ after update {update}: {row['weight_digests']}")
        history.append(row)
        if RANK == 0:
            with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"update {update:3d}/{args.num_updates} | steps {env_steps:6d} | success {row['success']:.2f} | "
              f"return {row['mean_return']:+.2f} | fmt_err {row['format_error_rate']:.2f} | read {row['readout_acc']:.2f} | "
              f"pg {row['pg_loss']:+.3f} | v {row['v_loss']:.3f} | kl {row['approx_kl']:.4f} | kl_ref {row['kl_ref']:.4f} | "
              f"clip {row['clipfrac']:.2f} | ev {row['explained_var']:+.2f} | {row['steps_per_second']:.0f} steps/s"
              + (f" | {WORLD} workers" if WORLD > 1 else ""), flush=True)
        print(f"    e.g. {data['gallery'][0]['answer']!r} -> {data['gallery'][0]['action']}", flush=True)
        if (args.save_every and update % args.save_every == 0) or update == args.num_updates:
            workers = gather(worker_state(rng, generator, vec, episodes))      # every worker's RNGs and envs
            if RANK == 0:
                save_checkpoint(policy, {"optimizer": optimizer.state_dict(), "workers": workers},
                                dict(update=update, env_steps=env_steps, workers=WORLD, args=dataclasses.asdict(args)),
                                args.output_dir)
    return history


def print_table(args, before, after, baselines):
    print(f"\n{'eval success (' + str(args.eval_episodes) + ' episodes)':34s} {'before RL':>10s} {'after RL':>10s}")
    for mode in ("sampled", "greedy"):
        label = f"  sampled (T={args.temperature})" if mode == "sampled" else "  greedy"
        print(f"{label:34s} {before[mode]['success']:10.2f} {after[mode]['success']:10.2f}")
    print(f"{'  read-out accuracy (sampled)':34s} {before['sampled']['readout_acc']:10.2f} {after['sampled']['readout_acc']:10.2f}")
    print(f"{'  random policy / oracle':34s} {baselines['random']:10.2f} {baselines['oracle']:10.2f}")


def train(args):
    t0 = time.time()
    policy, rng, generator = setup(args)
    if args.dry_run:
        return dry_run(policy, args, rng, generator)
    before_path = os.path.join(args.output_dir, "before_rl.json")
    if args.resume:                 # SFT and the first evaluation are done: read their result
        with open(before_path) as f:
            before = json.load(f)
    else:
        if args.sft_steps:
            print_memory(policy, args, "SFT", min(args.micro_batch_size, args.sft_batch_size))
            sft_warm_start(policy, args, rng)
            # RL freezes these weights (LoRA after SFT) or keeps them as the KL reference: keep them for --resume
            if (args.lora_rank > 0 or args.kl_coef > 0) and not args.lora_in_sft and RANK == 0:
                policy.vlm.save_pretrained(os.path.join(args.output_dir, "sft_model"))
                policy.processor.save_pretrained(os.path.join(args.output_dir, "sft_model"))
        if RANK == 0:               # rank 0 alone evaluates; the other workers wait for it at the next exchange
            before = {mode: evaluate(policy, args, mode == "greedy", rng) for mode in ("sampled", "greedy")}
            with open(before_path, "w") as f:
                json.dump(before, f)
    if RANK == 0:
        baselines = {kind: baseline_success(args.task, args.eval_episodes, kind, args.seed) for kind in ("random", "oracle")}
        print(f"before RL: success {before['sampled']['success']:.2f} sampled, {before['greedy']['success']:.2f} greedy | "
              f"read-out {before['sampled']['readout_acc']:.2f} | random {baselines['random']:.2f} | oracle {baselines['oracle']:.2f}", flush=True)
    optimizer = start_rl(policy, args)
    print_memory(policy, args, "RL", args.micro_batch_size)
    history = ppo_loop(policy, optimizer, args, rng, generator)
    if RANK > 0:
        return None
    after = {mode: evaluate(policy, args, mode == "greedy", rng) for mode in ("sampled", "greedy")}
    env_steps = args.num_updates * args.batch_size * WORLD
    levels = {"SFT only (sampled)": before["sampled"]["success"], "random": baselines["random"],
              "oracle": baselines["oracle"]}
    plot_curve(history, os.path.join(args.output_dir, "learning_curve.png"), f"{args.task}: PPO after SFT", levels)
    save_final_model(policy, os.path.join(args.output_dir, "final_model"))
    prompt_tokens, image_tokens = prompt_shape(policy, args)
    summary = dict(task=args.task, model=args.model, seed=args.seed, prompt_tokens=prompt_tokens, image_tokens=image_tokens,
                   eval_success_before_rl=before["sampled"]["success"], eval_success_after_rl=after["sampled"]["success"],
                   eval_greedy_success_before_rl=before["greedy"]["success"], eval_greedy_success_after_rl=after["greedy"]["success"],
                   random_success=baselines["random"], oracle_success=baselines["oracle"], env_steps=env_steps,
                   wall_seconds=time.time() - t0, before=before, after=after)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_table(args, before, after, baselines)
    print(f"{env_steps} env steps in {summary['wall_seconds']:.0f} s; outputs in {args.output_dir}/")
    return summary


# ---- MAIN ----
def main(argv=None):
    args = parse_args(argv)
    if RANK > 0:
        sys.stdout = open(os.devnull, "w")      # rank 0 alone prints
    try:
        train(args)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
