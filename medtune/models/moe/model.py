"""``medtune_moe_vlm``: a composed VLM whose LLM has mixture-of-experts layers (upcycled from its dense FFNs).

The classes subclass medtune_vlm's (themselves LLaVA's), so everything about the vision side, the projector,
image-token scattering and generation is LLaVA's; the only change is that the decoder layers listed in
``config.moe_layers`` get a :class:`medtune.models.moe.layers.MoEBlock` in place of their FFN, built from
``config.moe`` (:class:`medtune.models.moe.settings.MoESettings`). Nothing here needs DeepSpeed or a process
group: routing, experts and the shared expert run in one process, on any device.

Checkpoints are safetensors with every expert under its own keys (``mlp.experts.{e}.gate_proj.weight`` ..., or
``mlp.experts.{e}.fc1.weight`` ... for Phi: the layout of released MoE checkpoints), fused into 3-D tensors on
load. The layout is registered for the class of the inner LLM (:func:`medtune.models.moe.layers.register_expert_layout`), not for this
class, because one class can hold LLMs with either FFN layout.
Importing this module registers ``medtune_moe_vlm`` with AutoConfig, AutoModel and AutoModelForImageTextToText.
This module, medtune_vlm.py and the MoE blocks' modules are also what a checkpoint carries as remote code
(:mod:`medtune.models.export`): medtune is imported only as ``from medtune.<...>.<module> import names``.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
from torch import nn

from medtune.models.moe.layers import build_layers, register_expert_layout, upcycle_layers
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


class MedtuneMoEVLMForConditionalGeneration(MedtuneVLMForConditionalGeneration):
    config_class = MedtuneMoEVLMConfig
    config: MedtuneMoEVLMConfig
    inner_model_class = MedtuneMoEVLMModel

    @classmethod
    def from_dense(cls, dense: nn.Module, settings: MoESettings, *,
                   router_state: dict | None = None) -> MedtuneMoEVLMForConditionalGeneration:
        """Upcycle a dense Llava-layout model (Llava or medtune_vlm): the FFNs of ``settings``' layers become
        experts. In place: the new model holds ``dense``'s modules (tower, projector, LLM, head), not copies."""
        import torch

        language_model = dense.model.language_model
        layers = settings.layer_indices(len(language_model.layers))
        values = {**dense.config.to_dict(), "moe": settings.to_dict(), "moe_layers": layers,
                  "projector_type": getattr(dense.config, "projector_type", "mlp2x_gelu"),
                  "lm_head_bias": dense.lm_head.bias is not None}
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            values.pop(key, None)
        config = cls.config_class(**values)
        with torch.device("meta"):
            model = cls(config)
        model.model.vision_tower = dense.model.vision_tower
        model.model.multi_modal_projector = dense.model.multi_modal_projector
        model.model.language_model = language_model
        model.lm_head = dense.lm_head
        model.generation_config = dense.generation_config
        upcycle_layers(language_model.layers, settings, config.text_config.hidden_size, router_state=router_state)
        register_expert_layout(language_model)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_meta:
                raise RuntimeError(f"upcycling left {name} uninitialised (meta tensor)")
        model.train(dense.training)
        return model


def register() -> None:
    """Make the Auto classes know medtune_moe_vlm (idempotent; runs on import)."""
    AutoConfig.register(MedtuneMoEVLMConfig.model_type, MedtuneMoEVLMConfig, exist_ok=True)
    AutoModel.register(MedtuneMoEVLMConfig, MedtuneMoEVLMModel, exist_ok=True)
    AutoModelForImageTextToText.register(MedtuneMoEVLMConfig, MedtuneMoEVLMForConditionalGeneration,
                                         exist_ok=True)


register()
