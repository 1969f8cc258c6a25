"""Projectors: map vision-tower features (batch, patches, vision_width) into the LLM's embedding space.

- ``linear``: one Linear layer (LLaVA v1).
- ``mlp2x_gelu``: Linear → GELU → Linear (LLaVA-1.5, LLaVA-Med, Med-MoE, GMAI-VL). Its submodules are
  named like transformers' ``LlavaMultiModalProjector`` (linear_1, act, linear_2) so weights move
  between the two without renaming.
- ``attn_pool+mlp2x_gelu``: PathChat's projector. A fixed number of learned queries cross-attend over
  the patch features (layer norms on queries and on context), then LayerNorm → mlp2x_gelu. Every image
  becomes ``num_queries`` tokens whatever its number of patches. The queries may be narrower than the
  features (``query_width``: PathChat's are 768 wide over a 1,024-wide tower), the MLP then starts from the
  query width.
"""
from __future__ import annotations

import torch
from torch import nn

PROJECTOR_NAMES = ("linear", "mlp2x_gelu", "attn_pool+mlp2x_gelu")


class LinearProjector(nn.Module):
    def __init__(self, vision_width: int, llm_width: int):
        super().__init__()
        self.linear = nn.Linear(vision_width, llm_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class MLP2xGeluProjector(nn.Module):
    def __init__(self, vision_width: int, llm_width: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, llm_width)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_width, llm_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class AttentionPoolProjector(nn.Module):
    """Learned queries attend over the patch features; (batch, patches, V) -> (batch, num_queries, D)."""

    def __init__(self, vision_width: int, llm_width: int, num_queries: int = 128, num_heads: int = 8,
                 query_width: int | None = None):
        super().__init__()
        width = query_width or vision_width
        if width % num_heads:
            raise ValueError(f"attn_pool: query width {width} is not divisible by {num_heads} heads")
        # Small init keeps the queries in the range of layer-normed features at the start of training.
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.query_norm = nn.LayerNorm(width)
        self.context_norm = nn.LayerNorm(vision_width)
        # one width: the packed in-projection (the keys every earlier checkpoint has); two: separate ones
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True,
                                               kdim=vision_width, vdim=vision_width)
        self.output_norm = nn.LayerNorm(width)
        self.mlp = MLP2xGeluProjector(width, llm_width)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        context = self.context_norm(features)
        queries = self.query_norm(self.queries).unsqueeze(0).expand(features.shape[0], -1, -1)
        pooled, _ = self.attention(queries, context, context, need_weights=False)
        return self.mlp(self.output_norm(pooled))


def build_projector(name: str, vision_width: int, llm_width: int, *, num_queries: int = 128,
                    num_heads: int = 8, query_width: int | None = None) -> nn.Module:
    """The projector called ``name`` (one of PROJECTOR_NAMES); ``query_width`` is the attention pool's."""
    if name == "linear":
        return LinearProjector(vision_width, llm_width)
    if name == "mlp2x_gelu":
        return MLP2xGeluProjector(vision_width, llm_width)
    if name == "attn_pool+mlp2x_gelu":
        return AttentionPoolProjector(vision_width, llm_width, num_queries, num_heads, query_width)
    raise ValueError(f"unknown projector {name!r}; choose one of {', '.join(PROJECTOR_NAMES)}")
