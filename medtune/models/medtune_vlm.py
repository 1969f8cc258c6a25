"""medtune's own composed VLM class, for projectors transformers' LLaVA does not have.

A vision tower + projector + causal LM with the ``mlp2x_gelu`` projector *is* transformers'
``LlavaForConditionalGeneration``, and medtune builds exactly that. For ``linear`` and
``attn_pool+mlp2x_gelu`` we need a model class of our own; rather than re-implement the LLaVA forward
pass (placeholder mask, feature-layer choice, generation, caching), these classes *subclass* LLaVA's and
change the projector module (and allow a bias on the LM head, which LLaVA's class drops). The config subclasses ``LlavaConfig`` with model_type
``medtune_vlm`` and two extra fields, so every LLaVA option (image_token_id, vision_feature_layer,
vision_feature_select_strategy) means the same thing here.

Importing this module registers the classes with AutoConfig, AutoModel and AutoModelForImageTextToText,
so ``AutoModelForImageTextToText.from_pretrained(path)`` loads a medtune_vlm checkpoint (safetensors)
once medtune is imported. Without medtune, ``from_pretrained(path, trust_remote_code=True)`` loads it from the
copy of this module (and projectors.py) that every checkpoint carries (:mod:`medtune.models.export`); so this
module imports medtune only as ``from medtune.<...>.<module> import names``, which the copy makes relative.
"""
from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
)
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
import torch
from torch import nn

from medtune.models.projectors import PROJECTOR_NAMES, build_projector

FEATURE_SOURCES = ("hidden_states", "last_hidden_state")


def selected_features(outputs, config, strategy: str | None = None):
    """The tower's tokens that feed the projector: LLaVA's choice (the hidden state, or the concatenated hidden
    states, ``vision_feature_layer`` names) or, with ``vision_feature_source: last_hidden_state``, the tower's final
    output; without the CLS token for the ``default`` strategy. Used by the model and by medtune's tower-feature
    cache, so both select alike."""
    strategy = strategy or config.vision_feature_select_strategy

    def tokens(hidden):
        return hidden[:, 1:] if strategy == "default" else hidden

    layer = config.vision_feature_layer
    if getattr(config, "vision_feature_source", "hidden_states") == "last_hidden_state":
        return tokens(outputs.last_hidden_state)
    if isinstance(layer, int):
        return tokens(outputs.hidden_states[layer])
    return torch.cat([tokens(outputs.hidden_states[index]) for index in layer], dim=-1)


class MedtuneVLMConfig(LlavaConfig):
    """LlavaConfig plus the projector choice.

    projector_type: one of ``projectors.PROJECTOR_NAMES``.
    projector_queries: learned queries of the attention pool (= image tokens per image).
    projector_heads: attention heads of the attention pool; must divide the vision width.
    lm_head_bias: whether the LM head has a bias (Phi does; LLaVA's head never has one).
    projector_query_width: width of the attention pool's queries when it differs from the tower's (PathChat).
    vision_feature_source: ``hidden_states`` (LLaVA's: ``vision_feature_layer`` picks one) or
        ``last_hidden_state`` (the tower's final output, after its last norm: what timm's ``forward_features``
        gives PathChat's projector).
    """

    model_type = "medtune_vlm"

    projector_type: str = "linear"
    projector_queries: int = 128
    projector_heads: int = 8
    lm_head_bias: bool = False
    projector_query_width: int | None = None
    vision_feature_source: str = "hidden_states"

    def validate_architecture(self):
        """Part of transformers' strict-config validation: reject settings no model can be built from."""
        if self.projector_type not in PROJECTOR_NAMES:
            raise ValueError(f"unknown projector_type {self.projector_type!r}; choose one of {PROJECTOR_NAMES}")
        if self.projector_queries < 1 or self.projector_heads < 1:
            raise ValueError("projector_queries and projector_heads must be positive")
        if self.vision_feature_source not in FEATURE_SOURCES:
            raise ValueError(f"unknown vision_feature_source {self.vision_feature_source!r}; choose one of "
                             f"{FEATURE_SOURCES}")


class MedtuneVLMModel(LlavaModel):
    config_class = MedtuneVLMConfig
    config: MedtuneVLMConfig

    def __init__(self, config: MedtuneVLMConfig):
        # Skip LlavaModel.__init__ (it would build the MLP projector); build the same parts with ours.
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = build_projector(
            config.projector_type, config.vision_config.hidden_size, config.text_config.hidden_size,
            num_queries=config.projector_queries, num_heads=config.projector_heads,
            query_width=getattr(config, "projector_query_width", None))
        self.language_model = self.build_language_model(config)
        self.post_init()

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                           **kwargs):
        """LLaVA's, or with ``vision_feature_source: last_hidden_state`` the tower's final output."""
        if getattr(self.config, "vision_feature_source", "hidden_states") == "hidden_states":
            return super().get_image_features(pixel_values, vision_feature_layer=vision_feature_layer,
                                              vision_feature_select_strategy=vision_feature_select_strategy,
                                              **kwargs)
        for name in ("return_dict", "image_sizes", "output_hidden_states"):
            kwargs.pop(name, None)
        outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
        selected = selected_features(outputs, self.config, vision_feature_select_strategy)
        outputs.pooler_output = list(self.multi_modal_projector(selected))
        return outputs

    def build_language_model(self, config: MedtuneVLMConfig):
        """The decoder stack (a transformers base model from the text config); subclasses change its layers."""
        return AutoModel.from_config(config.text_config)


class MedtuneVLMForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = MedtuneVLMConfig
    config: MedtuneVLMConfig
    inner_model_class = MedtuneVLMModel
    """The model under the LM head; subclasses with other decoder layers name theirs."""

    def __init__(self, config: MedtuneVLMConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = self.inner_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size,
                                 bias=config.lm_head_bias)
        self.post_init()


def register() -> None:
    """Make the Auto classes know medtune_vlm (idempotent; runs on import)."""
    AutoConfig.register(MedtuneVLMConfig.model_type, MedtuneVLMConfig, exist_ok=True)
    AutoModel.register(MedtuneVLMConfig, MedtuneVLMModel, exist_ok=True)
    AutoModelForImageTextToText.register(MedtuneVLMConfig, MedtuneVLMForConditionalGeneration, exist_ok=True)


register()
