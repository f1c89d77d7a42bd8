"""Tiny random image-text-to-text checkpoints of the VLM families rl4vlm_min.py supports (a test fixture).

`build_tiny_checkpoint(family, path, seed=0)` builds a TINY RANDOM checkpoint (text: hidden 64, 2 layers;
vision: hidden 32, 2 layers; a few hundred KB) with transformers' real model / processor classes, gives the
processor a chat template shaped like the family's real one, and saves model + processor with
`save_pretrained(path)`, so that it loads back with `AutoProcessor` / `AutoModelForImageTextToText`.

Image sizes and patch sizes are tiny too, and unlike any real checkpoint's (LLaVA-NeXT: a 32-px CLIP
tower with patch 8 and 32-64 px pinpoints, not 336/14), so that code which hard-codes one real
checkpoint's pixel sizes fails on them instead of passing by accident.

Tokenizers are built in code: a byte-level BPE without merges (each UTF-8 byte is a token, so any text
tokenizes) plus the family's special tokens, wrapped in `PreTrainedTokenizerFast`. No network access.

The tests train on each of them for two PPO updates. To try one yourself:
    python tiny_families.py llava_next /tmp/tiny-llava-next
    python rl4vlm_min.py --model /tmp/tiny-llava-next --dry-run
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, PreTrainedTokenizerFast

# Widths shared by all families (only the widths are tiny, see module docstring).
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=8192)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

# --------------------------------------------------------------------------------------------------
# Chat templates (Jinja), modelled on the real checkpoints' templates.
# --------------------------------------------------------------------------------------------------

# llava-hf/llava-1.5-7b-hf: "USER: <image>\n<prompt> ASSISTANT:" (images first, then text).
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\n<prompt> [/INST]" ([/INST] is the generation prompt).
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# llava-hf/llava-onevision-qwen2-*-ov-hf: ChatML, "<|im_start|>user <image>\n<prompt><|im_end|>\n".
LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL (identical): ChatML with a default system prompt and
# "<|vision_start|><|image_pad|><|vision_end|>" per image.
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# HuggingFaceM4/Idefics3-8B-Llama3: "<|begin_of_text|>User:<image><prompt><end_of_utterance>\nAssistant:".
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'].capitalize() }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# HuggingFaceTB/SmolVLM-*-Instruct: same as Idefics3 but starts with "<|im_start|>".
SMOLVLM_TEMPLATE = IDEFICS3_TEMPLATE.replace("<|begin_of_text|>", "<|im_start|>", 1)

# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _tokenizer(special_tokens, *, eos, pad, bos=None, prepend_bos=False):
    """Byte-level BPE with no merges (1 token per UTF-8 byte) + `special_tokens` (1 token each).

    Special tokens get ids 256, 257, ... in the given order. If `prepend_bos`, encoding with
    add_special_tokens=True prepends `bos` (as Llama/Mistral tokenizers do).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys([t for t in (bos, eos, pad) if t] + list(special_tokens)))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if prepend_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)


def _ids(tokenizer, **names):
    """Token ids for the text config (bos/eos/pad) and the vocab size (rounded up to 64)."""
    out = {k + "_token_id": tokenizer.convert_tokens_to_ids(v) if v else None for k, v in names.items()}
    out["vocab_size"] = -(-len(tokenizer) // 64) * 64
    return out


def _finish(model, processor, path):
    """Set generation ids from the tokenizer and save model + processor."""
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------
# Family builders: each returns (model, processor). Vision geometry: tiny, unlike the real checkpoints'.
# --------------------------------------------------------------------------------------------------


def _llava(anyres: bool):
    """llava-1.5 (CLIP + Llama) or llava-v1.6-mistral (CLIP, Mistral text, anyres); real: 336 px, patch 14.
    Tiny: llava-1.5 at 56 px / patch 14 (16 tokens), llava-next at 32 px / patch 8 (16 tokens a tile)."""
    side, patch = (32, 8) if anyres else (56, 14)
    tok = _tokenizer(["<image>"], bos="<s>", eos="</s>", pad="<pad>", prepend_bos=True)
    vision = transformers.CLIPVisionConfig(**VISION, image_size=side, patch_size=patch)
    text_cls = transformers.MistralConfig if anyres else transformers.LlamaConfig
    text = text_cls(**TEXT, **_ids(tok, bos="<s>", eos="</s>", pad="<pad>"))
    common = dict(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                  vision_feature_select_strategy="default", vision_feature_layer=-2,
                  image_seq_length=(side // patch) ** 2)
    # CLIP has a CLS token (+1) which the "default" strategy drops again (-1): (side/patch)^2 tokens per tile.
    proc_kw = dict(tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1)
    ip_kw = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    if not anyres:
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**common))
        processor = transformers.LlavaProcessor(
            image_processor=transformers.LlavaImageProcessor(**ip_kw), chat_template=LLAVA_TEMPLATE, **proc_kw)
        return model, processor
    pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]   # real: 336..1008 px
    model = transformers.LlavaNextForConditionalGeneration(
        transformers.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints))
    processor = transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessor(**ip_kw, image_grid_pinpoints=pinpoints),
        chat_template=LLAVA_NEXT_TEMPLATE, **proc_kw)
    return model, processor


def _llava_onevision():
    """llava-onevision-qwen2 (SigLIP without head + Qwen2 text, anyres_max_9); real: 384 px, patch 14.
    Tiny: 48 px / patch 8 (36 tokens a tile), pinpoints the real grid's 1..6 x 1..6 tiles of 48 px."""
    side, patch = 48, 8
    pinpoints = [[side * i, side * j] for i in range(1, 7) for j in range(1, 7)]
    tok = _tokenizer(["<|im_start|>", "<image>", "<video>"], eos="<|im_end|>", pad="<|endoftext|>")
    vision = transformers.SiglipVisionConfig(**VISION, image_size=side, patch_size=patch, vision_use_head=False)
    text = transformers.Qwen2Config(**TEXT, **_ids(tok, eos="<|im_end|>", pad="<|endoftext|>"))
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=pinpoints)
    model = transformers.LlavaOnevisionForConditionalGeneration(config)
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(
            image_grid_pinpoints=pinpoints, size={"height": side, "width": side}),
        video_processor=transformers.LlavaOnevisionVideoProcessor(),
        tokenizer=tok, num_image_tokens=(side // patch) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=LLAVA_ONEVISION_TEMPLATE)
    return model, processor


def _qwen_vl(v2_5: bool):
    """Qwen2-VL / Qwen2.5-VL (2x2 merge, temporal patch 2; M-RoPE text); real patch 14, tiny patch 16."""
    specials = ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(specials, eos="<|im_end|>", pad="<|endoftext|>")
    text = dict(**TEXT, **_ids(tok, eos="<|im_end|>", pad="<|endoftext|>"),
                # M-RoPE splits the head_dim/2 = 8 rotary frequencies into (temporal, height, width)
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    grid = dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
    if v2_5:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT["hidden_size"],
                      window_size=128, fullatt_block_indexes=[1], tokens_per_second=2, **grid)
        config_cls, model_cls, proc_cls = (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration,
                                           transformers.Qwen2_5_VLProcessor)
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2, **grid)
        config_cls, model_cls, proc_cls = (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration,
                                           transformers.Qwen2VLProcessor)
    tid = tok.convert_tokens_to_ids
    config = config_cls(text_config=text, vision_config=vision, image_token_id=tid("<|image_pad|>"),
                        video_token_id=tid("<|video_pad|>"), vision_start_token_id=tid("<|vision_start|>"),
                        vision_end_token_id=tid("<|vision_end|>"))
    processor = proc_cls(image_processor=transformers.Qwen2VLImageProcessor(patch_size=16, merge_size=2),
                         video_processor=transformers.Qwen2VLVideoProcessor(),
                         tokenizer=tok, chat_template=QWEN_VL_TEMPLATE)
    return model_cls(config), processor


def _idefics3(smolvlm: bool):
    """Idefics3-8B (real SigLIP 364/14, pixel-shuffle 2 -> 169 tokens a crop; Llama-3 text) or
    SmolVLM-256M-Instruct (real 512/16, pixel-shuffle 4 -> 64 a crop; SmolLM2 = Llama text).
    Tiny: 64 px / patch 8 with the same pixel shuffles: 16 and 4 tokens a crop."""
    rows_cols = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    bos = "<|im_start|>" if smolvlm else "<|begin_of_text|>"
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *rows_cols]
    tok = _tokenizer(specials, bos=bos, eos="<end_of_utterance>", pad="<|endoftext|>")
    crop, patch, scale = (64, 8, 4) if smolvlm else (64, 8, 2)
    image_seq_len = (crop // patch) ** 2 // scale**2
    vision_cls = transformers.SmolVLMVisionConfig if smolvlm else transformers.Idefics3VisionConfig
    vision = vision_cls(**VISION, image_size=crop, patch_size=patch)
    text = transformers.LlamaConfig(**TEXT, **_ids(tok, bos=bos, eos="<end_of_utterance>", pad="<|endoftext|>"))
    ip_kw = dict(size={"longest_edge": 4 * crop}, max_image_size={"longest_edge": crop})  # as the real ones
    if smolvlm:
        config = transformers.SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=scale,
                                            image_token_id=tok.convert_tokens_to_ids("<image>"))
        processor = transformers.SmolVLMProcessor(
            image_processor=transformers.SmolVLMImageProcessor(**ip_kw),
            video_processor=transformers.SmolVLMVideoProcessor(**ip_kw),
            tokenizer=tok, image_seq_len=image_seq_len, chat_template=SMOLVLM_TEMPLATE)
        return transformers.SmolVLMForConditionalGeneration(config), processor
    config = transformers.Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale,
                                         image_token_id=tok.convert_tokens_to_ids("<image>"))
    processor = transformers.Idefics3Processor(
        image_processor=transformers.Idefics3ImageProcessor(**ip_kw), tokenizer=tok,
        image_seq_len=image_seq_len, chat_template=IDEFICS3_TEMPLATE)
    return transformers.Idefics3ForConditionalGeneration(config), processor


BUILDERS = {
    "llava": lambda: _llava(anyres=False),
    "llava_next": lambda: _llava(anyres=True),
    "llava_onevision": _llava_onevision,
    "qwen2_vl": lambda: _qwen_vl(v2_5=False),
    "qwen2_5_vl": lambda: _qwen_vl(v2_5=True),
    "idefics3": lambda: _idefics3(smolvlm=False),
    "smolvlm": lambda: _idefics3(smolvlm=True),  # needs the `num2words` package (SmolVLMProcessor)
}
FAMILIES = list(BUILDERS)


def build_tiny_checkpoint(family: str, path: str, seed: int = 0) -> str:
    """Build a tiny random `family` checkpoint (model + processor with chat template) and save it to `path`."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    torch.manual_seed(seed)
    model, processor = BUILDERS[family]()
    return _finish(model.eval(), processor, path)


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 3 or sys.argv[1] not in FAMILIES:
        sys.exit(f"usage: python tiny_families.py {{{','.join(FAMILIES)}}} OUTPUT_DIR")
    print(build_tiny_checkpoint(sys.argv[1], sys.argv[2]))
