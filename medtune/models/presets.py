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
    """The preset called ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)
