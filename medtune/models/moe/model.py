"""``medtune_moe_vlm``: a composed VLM whose LLM has mixture-of-experts layers (upcycled from its dense FFNs).

The classes subclass medtune_vlm's (themselves LLaVA's), so everything about the vision side, the projector,
image-token scattering and generation is LLaVA's; the only change is that the decoder layers listed in
``config.moe_layers`` get a :class:`medtune.models.moe.layers.MoEBlock` in place of their FFN, built from
``config.moe`` (:class:`medtune.models.moe.settings.MoESettings`). Nothing here needs DeepSpeed or a process
group: routing, experts and the shared expert run in one process, on any device.

Checkpoints are safetensors with every expert under its own keys (``mlp.experts.{e}.gate_proj.weight`` ..., or
``mlp.experts.{e}.fc1.weight`` ... for Phi: the layout of released MoE checkpoints), fused into 3-D tensors on
load. The layout is registered for the class of the inner LLM (:func:`register_expert_layout`), not for this
class, because one class can hold LLMs with either FFN layout.
Importing this module registers ``medtune_moe_vlm`` with AutoConfig, AutoModel and AutoModelForImageTextToText.
This module, medtune_vlm.py and the MoE blocks' modules are also what a checkpoint carries as remote code
(:mod:`medtune.models.export`): medtune is imported only as ``from medtune.<...>.<module> import names``.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
from torch import nn

from medtune.models.moe.layers import build_layers, moe_blocks, register_checkpoint_layout
from medtune.models.medtune_vlm import MedtuneVLMConfig, MedtuneVLMForConditionalGeneration, MedtuneVLMModel
from medtune.models.moe.settings import MoESettings


class MedtuneMoEVLMConfig(MedtuneVLMConfig):
    """MedtuneVLMConfig plus the experts.

    moe: the :class:`MoESettings` the experts were made with (as a dict).
    moe_layers: the decoder layers that have experts (resolved from ``moe.layers`` for this LLM).
    """

    model_type = "medtune_moe_vlm"

    moe: dict | None = None
    moe_layers: list | None = None

    def validate_architecture(self):
        super().validate_architecture()
        if self.moe is not None:
            MoESettings.from_dict(self.moe)   # raises with the key that is wrong


class MedtuneMoEVLMModel(MedtuneVLMModel):
    config_class = MedtuneMoEVLMConfig
    config: MedtuneMoEVLMConfig

    def build_language_model(self, config: MedtuneMoEVLMConfig):
        language_model = super().build_language_model(config)
        settings = MoESettings.from_dict({**config.moe, "layers": list(config.moe_layers)})
        build_layers(language_model.layers, settings, config.text_config.hidden_size)
        register_expert_layout(language_model)
        return language_model


def register_expert_layout(language_model: nn.Module) -> None:
    """Per-expert keys on disk for this LLM's class, in its FFN layout (gated, or fc for Phi)."""
    blocks = moe_blocks(language_model)
    if blocks:
        register_checkpoint_layout(type(language_model).__name__, blocks[0][1].ffn_layout)


class MedtuneMoEVLMForConditionalGeneration(MedtuneVLMForConditionalGeneration):
    config_class = MedtuneMoEVLMConfig
    config: MedtuneMoEVLMConfig
    inner_model_class = MedtuneMoEVLMModel


def register() -> None:
    """Make the Auto classes know medtune_moe_vlm (idempotent; runs on import)."""
    AutoConfig.register(MedtuneMoEVLMConfig.model_type, MedtuneMoEVLMConfig, exist_ok=True)
    AutoModel.register(MedtuneMoEVLMConfig, MedtuneMoEVLMModel, exist_ok=True)
    AutoModelForImageTextToText.register(MedtuneMoEVLMConfig, MedtuneMoEVLMForConditionalGeneration,
                                         exist_ok=True)


register()
