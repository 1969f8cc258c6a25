"""Model presets: tiny random models for tests and the demo, built fully offline.

Both presets pair a CLIP-style vision tower with a Llama-style LM, both built from configs (random
weights), and the offline byte-level BPE tokenizer (2,048 tokens including the image and chat markers), so nothing is
fetched from a hub. Parameter counts (mlp2x_gelu projector, measured with build_vlm):

- ``tiny``: 32 px images, 8 px patches (16 image tokens), 2-layer width-32 tower, 2-layer width-32 LM:
  196,320 parameters (attn_pool with its 8 queries: 200,992). Builds in 0.1 s; for unit tests.
- ``small``: 64 px images, 8 px patches (64 image tokens), 4-layer width-128 tower, 4-layer width-256
  LM: 6,170,624 parameters (attn_pool with 32 queries: 6,241,536). About 1.8 s per AdamW step for a
  batch of 8 x 128 tokens on one CPU thread, so a demo run of a few hundred steps takes minutes.

Attention-pool presets use fewer queries than PathChat's 128 so that an image is not longer than the
text; pass ``projector_queries=128`` to get the published setting.

- ``tiny-chameleon``: a discrete-token model (:func:`tiny_chameleon`): a 2-layer width-32
  Chameleon whose VQ turns a 32-px image into 8 x 8 = 64 codes from a 64-code book, with the offline tokenizer
  plus Chameleon's special tokens. The CPU stand-in for Anole 7B in the MedMax recipe's tiny run.

Native presets (:data:`NATIVE_PRESETS`): one tiny model per transformers VLM family medtune trains as the
``native`` kind, each built from its family's config classes (random weights; 1-layer width-32 vision tower,
1-layer width-64 language model, 8-px patches of 32-px images) with the family's real processor class (a PIL
image processor; where the family also reads videos, the processor without its video part: see
:mod:`medtune.models.kinds.native`), the offline tokenizer plus the family's special tokens, and a chat template
in the family's format (the real template's structure, without its long system prompts):

=====================  ===========================================  =========================================
preset                 model class                                  image tokens per 32-px image
=====================  ===========================================  =========================================
``tiny-qwen2-vl``      Qwen2VLForConditionalGeneration              4 (16 patches merged 2 x 2)
``tiny-qwen2.5-vl``    Qwen2_5_VLForConditionalGeneration           4
``tiny-idefics3``      Idefics3ForConditionalGeneration (SmolVLM)   4 (pixel shuffle, scale 2)
``tiny-smolvlm``       SmolVLMForConditionalGeneration (SmolVLM2)   4
``tiny-llava-hf``      LlavaForConditionalGeneration (llava-hf)     16
``tiny-llava-next``    LlavaNextForConditionalGeneration            base + tiles (any-resolution grid)
``tiny-internvl``      InternVLForConditionalGeneration             4 per tile (up to 2 tiles + thumbnail)
``tiny-gemma3``        Gemma3ForConditionalGeneration (MedGemma)    4 (average-pooled soft tokens)
=====================  ===========================================  =========================================
"""
from __future__ import annotations

from typing import Any

from medtune.models.build import ModelSpec


def _clip(image_size: int, patch_size: int, width: int, layers: int, heads: int) -> dict[str, Any]:
    return {"model_type": "clip_vision_model", "image_size": image_size, "patch_size": patch_size,
            "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
            "num_attention_heads": heads}


def _llama(width: int, layers: int, heads: int, kv_heads: int, max_positions: int) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": width, "intermediate_size": 4 * width,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": max_positions, "tie_word_embeddings": False}


def tiny_spec(template: str = "vicuna", projector: str = "mlp2x_gelu", **overrides: Any) -> ModelSpec:
    """The smallest useful composed VLM (see module docstring); ``overrides`` replace ModelSpec fields."""
    settings = dict(vision=_clip(image_size=32, patch_size=8, width=32, layers=2, heads=4),
                    llm=_llama(width=32, layers=2, heads=4, kv_heads=2, max_positions=1024),
                    projector=projector, projector_queries=8, projector_heads=4, tokenizer="offline",
                    template=template)
    return ModelSpec.from_dict(_override(settings, overrides))


def small_spec(template: str = "vicuna", projector: str = "mlp2x_gelu", **overrides: Any) -> ModelSpec:
    """The demo model: still CPU-trainable in minutes (see module docstring)."""
    settings = dict(vision=_clip(image_size=64, patch_size=8, width=128, layers=4, heads=4),
                    llm=_llama(width=256, layers=4, heads=4, kv_heads=4, max_positions=2048),
                    projector=projector, projector_queries=32, projector_heads=4, tokenizer="offline",
                    template=template)
    return ModelSpec.from_dict(_override(settings, overrides))


def _override(settings: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The preset's settings with ``overrides`` on top; a mapping given for a mapping setting (the vision tower's
    or the LM's config) updates it key by key, so ``vision: {patch_size: 16}`` keeps the rest of the tower."""
    return {**settings, **{key: {**settings[key], **value}
                           if isinstance(value, dict) and isinstance(settings.get(key), dict) else value
                           for key, value in overrides.items()}}


PRESETS = {"tiny": tiny_spec, "small": small_spec}


def preset_spec(name: str, **overrides: Any) -> ModelSpec:
    """The composed preset called ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESET_NAMES)}")
    return PRESETS[name](**overrides)


def tiny_chameleon(*, codebook_size: int = 64, image_size: int = 32, width: int = 32, layers: int = 2,
                   seed: int = 0):
    """A randomly initialised Chameleon (8 x 8 = 64 codes per 32-px image) with an offline tokenizer, as a
    :class:`medtune.models.kinds.discrete.DiscreteVLM` (chat template ``chameleon``)."""
    import torch
    from transformers import ChameleonConfig

    from medtune.models.chameleon import BOI, END_OF_TURN, EOI, MedtuneChameleonForConditionalGeneration, image_code_token
    from medtune.models.kinds.discrete import DiscreteVLM
    from medtune.models.templates import get_template
    from medtune.models.tokenizer import offline_tokenizer

    tokenizer = offline_tokenizer()
    tokenizer.add_tokens([BOI, EOI, END_OF_TURN, *(image_code_token(c) for c in range(codebook_size))],
                         special_tokens=True)
    tokenizer.chat_template = get_template("chameleon").jinja
    torch.manual_seed(seed)
    config = ChameleonConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, vocabulary_map=dict(tokenizer.get_vocab()),
        # three VQ levels halve 32 px twice: an 8 x 8 grid of codes
        vq_config=dict(embed_dim=8, num_embeddings=codebook_size, latent_channels=8, resolution=image_size,
                       base_channels=32, channel_multiplier=[1, 1, 1], num_res_blocks=1, attn_resolutions=None))
    model = MedtuneChameleonForConditionalGeneration(config).eval()
    return DiscreteVLM.assemble(model, tokenizer, template="chameleon")


# ---- native presets -----------------------------------------------------------------------------------------

NATIVE_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     image_size=32, patch_size=8)
NATIVE_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024)

CHATML_TEMPLATE = (   # Qwen2-VL / InternVL style: one ChatML turn per message, images as the family's marker
    "{%- for message in messages -%}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{ image_marker }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}")
QWEN_VL_TEMPLATE = "{%- set image_marker = '<|vision_start|><|image_pad|><|vision_end|>' -%}" + CHATML_TEMPLATE
INTERNVL_TEMPLATE = "{%- set image_marker = '<IMG_CONTEXT>\n' -%}" + CHATML_TEMPLATE
SMOLVLM_TEMPLATE = (   # HuggingFaceTB/SmolVLM-Instruct's
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
LLAVA_TEMPLATE = (   # llava-hf/llava-1.5-7b-hf's, with the end of sequence after each reply
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
LLAVA_NEXT_TEMPLATE = (   # llava-hf/llava-v1.6-mistral-7b-hf's
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + eos_token + ' ' }}{% endif %}{% endfor %}")
GEMMA3_TEMPLATE = (   # google/gemma-3-4b-it's turns (the system prompt, if any, is not folded into the first turn)
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def family_tokenizer(named: dict[str, str], others: tuple[str, ...] = ()):
    """The offline tokenizer with a family's special tokens, ``named`` ones as tokenizer attributes
    (``tokenizer.image_token`` ...), as the family's processor reads them."""
    import tempfile

    from transformers import AutoTokenizer

    from medtune.models.tokenizer import offline_tokenizer

    tokenizer = offline_tokenizer()
    tokenizer.add_tokens([*named.values(), *others], special_tokens=True)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        return AutoTokenizer.from_pretrained(directory, extra_special_tokens=dict(named))


def _token_ids(tokenizer) -> dict[str, int]:
    return dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def _native(model, processor, end_of_turn: str | None = None):
    """The native kind object; generation stops at the family's end-of-turn token too."""
    from medtune.models.kinds.native import NativeVLM

    tokenizer = processor.tokenizer
    stops = {tokenizer.eos_token_id}
    if end_of_turn is not None:
        stops.add(tokenizer.convert_tokens_to_ids(end_of_turn))
    model.generation_config.eos_token_id = sorted(stops)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return NativeVLM.assemble(model.eval(), processor)


def tiny_qwen2_vl(*, seed: int = 0, version: str = "2"):
    """Qwen2-VL (``version="2.5"``: Qwen2.5-VL): 32-px images, 8-px patches merged 2 x 2 (4 image tokens)."""
    import torch
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from medtune.models.kinds.native import make_processor

    tokenizer = family_tokenizer({"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                  "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    text = dict(NATIVE_TEXT, **_token_ids(tokenizer), rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    if version == "2.5":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=4, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[0])
        config_class, model_class, processor_class = (transformers.Qwen2_5_VLConfig,
                                                      transformers.Qwen2_5_VLForConditionalGeneration,
                                                      transformers.Qwen2_5_VLProcessor)
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        config_class, model_class, processor_class = (transformers.Qwen2VLConfig,
                                                      transformers.Qwen2VLForConditionalGeneration,
                                                      transformers.Qwen2VLProcessor)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    torch.manual_seed(seed)
    model = model_class(config_class(text_config=text, vision_config=vision, **ids))
    # every image becomes 32 x 32 px: 4 x 4 patches, merged 2 x 2 into 4 tokens
    image_processor = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2,
                                               temporal_patch_size=2)
    processor = make_processor(processor_class, image_processor, tokenizer, chat_template=QWEN_VL_TEMPLATE)
    return _native(model, processor, "<|im_end|>")


def tiny_qwen2_5_vl(*, seed: int = 0):
    """Qwen2.5-VL (window attention, a gated-MLP tower): as :func:`tiny_qwen2_vl`."""
    return tiny_qwen2_vl(seed=seed, version="2.5")


def tiny_idefics3(*, seed: int = 0, family: str = "idefics3"):
    """Idefics3 (SmolVLM's architecture; ``family="smolvlm"``: SmolVLM2's class): 4 image tokens per image."""
    import torch
    import transformers

    from medtune.models.kinds.native import make_processor

    tokenizer = family_tokenizer({"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                                  "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"})
    if family == "smolvlm":
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as Images

        config_class, model_class, processor_class = (transformers.SmolVLMConfig,
                                                      transformers.SmolVLMForConditionalGeneration,
                                                      transformers.SmolVLMProcessor)
    else:
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Images

        config_class, model_class, processor_class = (transformers.Idefics3Config,
                                                      transformers.Idefics3ForConditionalGeneration,
                                                      transformers.Idefics3Processor)
    torch.manual_seed(seed)
    config = config_class(text_config=dict(NATIVE_TEXT, model_type="llama", **_token_ids(tokenizer)),
                          vision_config=NATIVE_VISION, scale_factor=2,
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model = model_class(config)
    # (32 / 8)^2 patches merged 2 x 2 by pixel shuffle: 4 tokens; one 32-px image (no splitting into tiles)
    image_processor = Images(do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    processor = make_processor(processor_class, image_processor, tokenizer, chat_template=SMOLVLM_TEMPLATE,
                               image_seq_len=4)
    return _native(model, processor, "<end_of_utterance>")


def tiny_smolvlm(*, seed: int = 0):
    """SmolVLM2's model class (``smolvlm``): as :func:`tiny_idefics3`."""
    return tiny_idefics3(seed=seed, family="smolvlm")


def tiny_llava_hf(*, seed: int = 0, next_version: bool = False):
    """llava-hf LLaVA-1.5 (``next_version``: LLaVA-NeXT's any-resolution tiles): CLIP tower, MLP projector."""
    import torch
    import transformers

    from medtune.models.kinds.native import make_processor

    tokenizer = family_tokenizer({"image_token": "<image>"})
    vision = dict(NATIVE_VISION, model_type="clip_vision_model", num_hidden_layers=2, projection_dim=32)
    common = dict(text_config=dict(NATIVE_TEXT, model_type="llama", **_token_ids(tokenizer)), vision_config=vision,
                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                  vision_feature_select_strategy="default")
    # the CLIP tower's CLS token is dropped ("default"): the processor counts it, then takes one off
    settings = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    torch.manual_seed(seed)
    if next_version:
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        pinpoints = [[32, 32], [32, 64], [64, 32]]
        model = transformers.LlavaNextForConditionalGeneration(
            transformers.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints))
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                     image_grid_pinpoints=pinpoints)
        processor = make_processor(transformers.LlavaNextProcessor, image_processor, tokenizer,
                                   chat_template=LLAVA_NEXT_TEMPLATE, **settings)
    else:
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**common))
        image_processor = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = make_processor(transformers.LlavaProcessor, image_processor, tokenizer,
                                   chat_template=LLAVA_TEMPLATE, **settings)
    return _native(model, processor)


def tiny_llava_next(*, seed: int = 0):
    return tiny_llava_hf(seed=seed, next_version=True)


def tiny_internvl(*, seed: int = 0):
    """InternVL (InternViT + MLP projector + Qwen2): 32-px tiles, pixel shuffle to 4 tokens per tile."""
    import torch
    import transformers
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from medtune.models.kinds.native import make_processor

    tokenizer = family_tokenizer({"start_image_token": "<img>", "end_image_token": "</img>",
                                  "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    torch.manual_seed(seed)
    config = transformers.InternVLConfig(
        text_config=dict(NATIVE_TEXT, model_type="qwen2", **_token_ids(tokenizer)),
        vision_config=dict(NATIVE_VISION, image_size=[32, 32], patch_size=[8, 8]), downsample_ratio=0.5,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    model = transformers.InternVLForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                               min_patches=1, max_patches=2)
    processor = make_processor(transformers.InternVLProcessor, image_processor, tokenizer,
                               chat_template=INTERNVL_TEMPLATE, image_seq_length=4)
    return _native(model, processor, "<|im_end|>")


def tiny_gemma3(*, seed: int = 0, text_layers: int = 1):
    """Gemma 3 (MedGemma's architecture): SigLIP tower, 4 pooled soft tokens per image, bidirectional image
    attention from token types (``text_layers=2`` makes it visible in the loss of the text after an image)."""
    import torch
    import transformers
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from medtune.models.kinds.native import make_processor

    tokenizer = family_tokenizer({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                  "image_token": "<image_soft_token>"}, ("<start_of_turn>", "<end_of_turn>"))
    torch.manual_seed(seed)
    config = transformers.Gemma3Config(
        text_config=dict(NATIVE_TEXT, head_dim=16, sliding_window=64, num_hidden_layers=text_layers,
                         **_token_ids(tokenizer)),
        vision_config=dict(NATIVE_VISION, model_type="siglip_vision_model"), mm_tokens_per_image=4,
        image_token_id=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        boi_token_id=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_id=tokenizer.convert_tokens_to_ids("<end_of_image>"))
    model = transformers.Gemma3ForConditionalGeneration(config)
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = make_processor(transformers.Gemma3Processor, image_processor, tokenizer,
                               chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    return _native(model, processor, "<end_of_turn>")


NATIVE_PRESETS = {
    "tiny-qwen2-vl": tiny_qwen2_vl, "tiny-qwen2.5-vl": tiny_qwen2_5_vl, "tiny-idefics3": tiny_idefics3,
    "tiny-smolvlm": tiny_smolvlm, "tiny-llava-hf": tiny_llava_hf, "tiny-llava-next": tiny_llava_next,
    "tiny-internvl": tiny_internvl, "tiny-gemma3": tiny_gemma3,
}

# presets that are not composed models, by the function that builds them
MODEL_PRESETS = {"tiny-chameleon": tiny_chameleon, **NATIVE_PRESETS}
PRESET_NAMES = (*PRESETS, *MODEL_PRESETS)


def build_preset(name: str, **overrides: Any):
    """The model of preset ``name``, built (a composed ModelSpec is built with build_vlm)."""
    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name](**overrides)
    from medtune.models.build import build_vlm

    return build_vlm(preset_spec(name, **overrides))
