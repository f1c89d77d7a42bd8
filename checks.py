"""checks.py: bad input refused with what to do, and the guards a real checkpoint needs.

rl4vlm_min.py calls these through one-line hooks (a first reading skips them):
- the CLI's checks of its values: one line that names the flag to change, exit status 2;
- a NaN or inf loss, log-prob, value or gradient stops the run and says how to continue;
- real checkpoints: a missing or wrong --model, the per-family bounds that keep a 300x300 frame
  one view, what a processor must have, generate()'s settings made explicit (nothing that
  score() does not apply), and every dropout off during RL.
"""

import contextlib
import difflib
import os
import sys

import torch
import transformers

from envs import FRAME
from parallel import WORLD


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


# flags that were removed, and what replaced them
REMOVED = {
    "--minibatch-size": "--num-minibatches (the batch is split into that many minibatches)",
    "--pretrain-steps": "python build_tiny_llava.py --steps N --out DIR, then --model DIR (the "
    "tiny model is the folder tiny-llava/)",
    "--rebuild-tiny": "python build_tiny_llava.py (the tiny model is the folder tiny-llava/)",
}


def parse_cli(config_class, argv):
    """The config dataclass from the command line with transformers.HfArgumentParser. --help
    shows the kebab-case flags (--num-envs; --num_envs works too). A bad value or an unknown flag
    (a typo, or a removed one): one line naming it and the nearest valid flag, exit status 2."""
    parser = transformers.HfArgumentParser(config_class)
    parser.error = lambda message: fail(f"{message} (see python rl4vlm_min.py --help)")
    parser.allow_abbrev = False  # --num-env is a typo, not --num-envs
    for action in parser._actions:  # list the kebab-case spelling alone in --help
        kebab = [o for o in action.option_strings if "_" not in o]
        action.option_strings = kebab or action.option_strings
    args, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unknown:
        flag = next((a for a in unknown if a.startswith("-")), unknown[0])
        name = flag.split("=")[0].replace("_", "-")
        known = [o for action in parser._actions for o in action.option_strings]
        nearest = REMOVED.get(name) or difflib.get_close_matches(name, known, 1, 0.0)[0]
        hint = f"; did you mean {nearest}?" if flag.startswith("--") else ""
        fail(f"unknown argument {flag!r}{hint} (see python rl4vlm_min.py --help)")
    return args


def check_args(args, eval_seed):
    """Every value in range, or one line that says which flag to change (exit status 2).
    Training envs take seeds seed * 1000 + i, all below `eval_seed`, where evaluation's seeds
    start."""
    last_seed = (eval_seed - WORLD * args.num_envs) // 1000
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
        (
            args.lora_rank > 0 or not args.lora_in_sft,
            "--lora-in-sft trains the adapters only: give it a --lora-rank > 0",
        ),
        (args.max_new_tokens > 0, "--max-new-tokens must be > 0"),
        (args.eval_episodes > 0, "--eval-episodes must be > 0"),
        (args.sft_readout_steps >= -1, "--sft-readout-steps must be >= 0, or -1 (half of SFT)"),
        (
            0 <= args.seed <= last_seed,
            f"--seed must be in 0..{last_seed}: training envs take seeds seed * 1000 + i, "
            f"evaluation takes {eval_seed} on",
        ),
        (
            args.total_steps >= args.batch_size * WORLD,
            f"--total-steps must be at least one batch of all workers ({args.batch_size * WORLD})",
        ),
    ]
    for ok, message in checks:
        if not ok:
            fail(f"{message} (see python rl4vlm_min.py --help)")
    return args


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


def tiny_folder(path):
    """The embedded model's folder, or what to do if it is missing."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        fail(f"the embedded model's folder {path} is missing or incomplete; restore it with "
             "'git checkout -- tiny-llava' or rebuild it: python build_tiny_llava.py")  # fmt: skip
    return path


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


# ---- ONE SCORING FUNCTION: the logits the model's own forward computes, and no dropout in RL ----
def logit_transforms(config):
    """What a family's forward may do to its output layer's logits, named by its config: Gemma 2's
    soft-cap (cap * tanh(logits / cap)), a logit scale (Cohere multiplies by logit_scale, Granite
    divides by logits_scaling, HyperCLOVA X multiplies). Which one a model applies, if any, is
    measured by check_scoring (Gemma 3's config names a soft-cap that its forward never applies)."""
    text = config.get_text_config()
    out = {"none": None}
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        out["soft-cap"] = lambda logits: cap * torch.tanh(logits / cap)
    for name in ("logit_scale", "logits_scaling"):
        value = getattr(text, name, None)
        if isinstance(value, (int, float)) and value:
            out[f"times {name}"] = lambda logits, v=value: logits * v
            out[f"divided by {name}"] = lambda logits, v=value: logits / v
    return out


def output_logits(vlm, hidden):
    """The output layer on final hidden states (..., H), then the transform the model's own
    forward applies, in the model's dtype as the forward does (check_scoring finds it at setup;
    before it ran, none): fp32 logits (..., V) of the distribution generate() samples from."""
    logits = vlm.get_output_embeddings()(hidden)
    transform = getattr(vlm, "logit_transform", None)
    return (logits if transform is None else transform(logits)).float()


def probe_batch(policy):
    """One black frame and a one-line prompt in the model's chat template: a test input."""
    import numpy as np

    content = [{"type": "image"}, {"type": "text", "text": "What do you see?"}]
    messages = [{"role": "user", "content": content}]
    text = policy.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    return policy.encode_prompts([np.zeros((FRAME, FRAME, 3), np.uint8)], [text])


@torch.no_grad()
def check_scoring(policy):
    """Which logit transform the model's forward applies, measured on a probe and kept for
    output_logits; a model whose forward computes other logits is refused: score() would score
    another distribution than generate() samples from, and PPO would be off-policy."""
    batch, was_training = probe_batch(policy), policy.training
    policy.eval()
    ids, mask = batch.pop("input_ids"), batch.pop("attention_mask")
    own = policy.vlm(input_ids=ids, attention_mask=mask, use_cache=False, **batch).logits
    raw = policy.vlm.get_output_embeddings()(policy.hidden_states(ids, mask, batch))
    policy.train(was_training)
    own, transforms = own.float(), logit_transforms(policy.vlm.config)  # all positions (1, P, V)
    gaps = {}
    for name, transform in transforms.items():
        gaps[name] = (own - (transform(raw) if transform else raw).float()).abs().max().item()
    name = min(gaps, key=gaps.get)
    tolerance = 1e-4 if policy.vlm.dtype == torch.float32 else 2e-2  # the dtype's rounding
    if not gaps[name] <= tolerance * max(own.abs().max().item(), 1.0):
        kind = policy.vlm.config.model_type
        fail(f"the model type {kind!r} transforms its logits in a way score() does not know "
             f"(smallest difference {gaps[name]:.3g}); this file cannot train it")  # fmt: skip
    policy.vlm.logit_transform = transforms[name]
    if name != "none":
        print(f"note: this model's forward applies a {name} to its logits: so does score()")


def dropout_off(policy):
    """Every dropout probability to 0 during RL, whatever it is called: nn.Dropout modules, float
    fields such as attention_dropout or CLIP/SigLIP's `dropout`, and the configs they came from.
    The rollout scores the old log-probs in eval mode, the update in train mode: both must be the
    same function. A dropout this misses would make them differ, and the run refuses to start.
    The zeroed fields stay zero in the configs that final_model saves."""
    configs, stack = [], [policy.vlm.config]  # the model's config and its sub-configs, nested
    while stack:
        configs.append(stack.pop())
        inner = vars(configs[-1]).values()
        stack += [v for v in inner if isinstance(v, transformers.PretrainedConfig)]
    for obj in [*policy.modules(), *configs]:
        if isinstance(obj, torch.nn.Dropout):
            obj.p = 0.0
        for name, value in list(vars(obj).items()):
            if "dropout" in name.lower() and type(value) in (int, float) and value != 0:
                setattr(obj, name, 0.0)
    with torch.no_grad():
        batch, was_training = probe_batch(policy), policy.training
        ids, mask = batch.pop("input_ids"), batch.pop("attention_mask")
        states = []
        for train in (True, False):
            policy.train(train)
            states.append(policy.hidden_states(ids, mask, dict(batch)))
        policy.train(was_training)
    if not torch.equal(*states):
        fail("the model computes differently in train and eval mode with every dropout set to 0 "
             "(a dropout or train-only path this file cannot switch off): the PPO ratio would not "
             "start at 1; this model type is not supported")  # fmt: skip
