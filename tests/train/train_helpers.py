"""Tiny models and synthetic batches for the training tests (no tokenizer, no hub, CPU seconds)."""
from __future__ import annotations

import torch

VOCAB = 96
IMAGE_TOKEN_ID = 95
IMAGE_SIZE = 16
PATCH = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2   # "full" feature strategy keeps the CLS token too: + 1


def composed(model=None):
    """The composed kind object around ``model`` (what assigns parameters to parts), no tokenizer needed."""
    from medtune.models.kinds.composed import ComposedVLM

    return ComposedVLM(model=model, tokenizer=None)


def part_of(parameter_name: str) -> str:
    return composed().part_of(parameter_name)


def tiny_llava(seed: int = 0):
    """A 2-layer LLaVA (CLIP vision + Llama) of width 32 with an mlp2x_gelu projector."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                         projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    return LlavaForConditionalGeneration(config)


def synthetic_samples(n: int, *, seed: int = 0, text_only_every: int = 0, length: int = 12) -> list[dict]:
    """Encoded samples like encode_sample's output: image tokens first, labels on the answer half."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(n):
        with_image = not (text_only_every and index % text_only_every == 0)
        size = length + int(torch.randint(0, 6, (1,), generator=generator))
        text = torch.randint(3, IMAGE_TOKEN_ID, (size,), generator=generator).tolist()
        ids = ([IMAGE_TOKEN_ID] * (IMAGE_TOKENS + 1) if with_image else []) + text
        labels = [-100] * (len(ids) - size // 2) + ids[len(ids) - size // 2:]
        sample = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
        if with_image:
            sample["pixel_values"] = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).tolist()
        samples.append(sample)
    return samples
