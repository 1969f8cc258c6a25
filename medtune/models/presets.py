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
    return ModelSpec.from_dict({**settings, **overrides})


def small_spec(template: str = "vicuna", projector: str = "mlp2x_gelu", **overrides: Any) -> ModelSpec:
    """The demo model: still CPU-trainable in minutes (see module docstring)."""
    settings = dict(vision=_clip(image_size=64, patch_size=8, width=128, layers=4, heads=4),
                    llm=_llama(width=256, layers=4, heads=4, kv_heads=4, max_positions=2048),
                    projector=projector, projector_queries=32, projector_heads=4, tokenizer="offline",
                    template=template)
    return ModelSpec.from_dict({**settings, **overrides})


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

    from medtune.models.discrete import BOI, END_OF_TURN, EOI, MedtuneChameleonForConditionalGeneration, image_code_token
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


# presets that are not composed models, by the function that builds them
MODEL_PRESETS = {"tiny-chameleon": tiny_chameleon}
PRESET_NAMES = (*PRESETS, *MODEL_PRESETS)


def build_preset(name: str, **overrides: Any):
    """The model of preset ``name``, built (a composed ModelSpec is built with build_vlm)."""
    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name](**overrides)
    from medtune.models.build import build_vlm

    return build_vlm(preset_spec(name, **overrides))
