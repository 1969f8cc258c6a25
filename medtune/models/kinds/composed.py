"""The composed kind: a vision tower + projector + causal LM that medtune built (Llava or medtune_vlm).

Inputs are made by medtune, not by a processor call: the conversation is rendered with a medtune chat template
and tokenised in one call, each image placeholder is expanded to ``image_tokens_per_image`` copies (the model
scatters one image feature into each copy, in order), and pixels come from the image processor the checkpoint
saves, which also makes the image square (``pad_mode``: :func:`medtune.models.vision.squaring_image_processor`),
so plain transformers and vLLM compute the same pixels. Because ids and labels do not depend on the pixels,
encoded samples go through the token cache and images are decoded when a batch is made.

Batches always run the vision tower (:class:`medtune.models.collate.KeepVisionBusy`): under sharded training a
rank with a text-only batch would otherwise skip the tower's collectives and hang the others.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

from medtune.models.batch import IGNORE_INDEX
from medtune.models.collate import KeepVisionBusy
from medtune.models.kinds.base import VLM


@dataclass(kw_only=True)
class ComposedVLM(VLM):
    kind: ClassVar[str] = "composed"
    part_markers: ClassVar = (
        # a projector nested inside a vision module (Qwen2-VL's visual.merger) is a projector: checked first
        ("projector", ("multi_modal_projector", "projector", "mm_projector", "merger")),
        ("vision", ("vision_tower", "visual", "vision_model", "vision_encoder")),
        ("llm", ("language_model", "lm_head", "text_model")),
    )

    template: str = "vicuna"
    image_tokens_per_image: int = 1
    """Placeholder copies per image: the number of features the projector emits per image."""
    pad_mode: str = "pad"
    """How non-square images become square: ``pad`` (LLaVA's int(mean * 255) background), ``resize`` or ``crop``."""
    _features: Any = field(default=None, repr=False, compare=False)
    """The frozen tower's feature cache of a training run (:class:`TowerFeatureCache`), made on first use."""

    def __post_init__(self) -> None:
        import copy

        from medtune.models.export import use_released_layout
        from medtune.models.vision import squaring_image_processor

        # Trainer checkpoints call save_pretrained on this model directly: it must know its layout beforehand
        use_released_layout(self.model)
        # pad_mode is the one setting of how images become square and the image processor implements it: the
        # tower's processor (build_vlm), or a checkpoint's saved before squaring processors, becomes the
        # squaring one; a copy made by dataclasses.replace(vlm, pad_mode=...) gets its own, the original keeps its
        if self.image_processor is not None and self.image_size:
            squaring = squaring_image_processor(self.image_processor, self.pad_mode, self.image_size)
            if squaring is not self.image_processor:
                self.image_processor = squaring
                if self.processor is not None:
                    self.processor = copy.copy(self.processor)
                    self.processor.image_processor = squaring

    @classmethod
    def load(cls, source: str, metadata: dict[str, Any] | None, *, model_kwargs: dict, device: str) -> ComposedVLM:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        from medtune.models.registry import register_model_classes

        register_model_classes()

        model = AutoModelForImageTextToText.from_pretrained(source, **model_kwargs).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = AutoImageProcessor.from_pretrained(source)
        # Rebuilt rather than read: a training checkpoint may carry no processor_config.json, and the numbers
        # it needs are all in the model config and medtune.json.
        processor = composed_processor(model.config, tokenizer, image_processor, metadata["image_token"],
                                       metadata["image_tokens_per_image"])
        return cls(model=model, tokenizer=tokenizer, image_processor=image_processor, processor=processor,
                   template=metadata["template"], image_token=metadata["image_token"],
                   image_token_id=model.config.image_token_id,
                   image_tokens_per_image=metadata["image_tokens_per_image"], image_size=metadata["image_size"],
                   pad_mode=metadata["pad_mode"], spec=metadata.get("spec"),
                   sample_metadata=tuple(metadata.get("sample_metadata", ())))

    # ---- samples -> model inputs ------------------------------------------------------------------------

    def encode_tokens(self, sample, *, max_length: int, truncation: str = "text", image_root=None,
                      allowed_roots: Sequence = ()) -> dict[str, list]:
        """input_ids / attention_mask / labels of a sample, without loading its images (so no image root)."""
        from medtune.models.processing import SkipSample, expand_image_tokens, tokenize_segments, truncate
        from medtune.models.templates import get_template, render_with_tokenizer, to_chat_messages

        segments = render_with_tokenizer(get_template(self.template), to_chat_messages(sample), self.tokenizer,
                                         image_token=self.image_token)
        ids, trainable = tokenize_segments(segments, self.tokenizer)
        n_placeholders, n_images = ids.count(self.image_token_id), len(sample.images)
        if n_placeholders != n_images:
            raise SkipSample("image token in text", f"{n_placeholders} image tokens for {n_images} images "
                                                    f"(text must not contain {self.image_token!r})")
        labels = [token if train else IGNORE_INDEX for token, train in zip(ids, trainable)]
        if all(label == IGNORE_INDEX for label in labels):
            raise SkipSample("no assistant reply")
        ids, labels = expand_image_tokens(ids, labels, self.image_token_id, self.image_tokens_per_image)
        ids, labels = truncate(ids, labels, self.image_token_id, max_length=max_length, truncation=truncation)
        return self.token_row(ids, labels, self.carried_metadata(sample))

    def encode_sample(self, sample, image_root, *, max_length: int, truncation: str = "text",
                      allowed_roots: Sequence = ()) -> dict[str, Any]:
        encoded = self.encode_tokens(sample, max_length=max_length, truncation=truncation)
        return self.inputs_from_tokens(encoded, sample.images, image_root, allowed_roots=allowed_roots)

    def inputs_from_tokens(self, row: dict[str, Any], image_refs: list, image_root, *,
                           allowed_roots: Sequence = (), memo=None) -> dict[str, Any]:
        from medtune.models.processing import load_images

        def decode(refs):
            return self.pixel_values(load_images(refs, image_root, allowed_roots=allowed_roots))

        example = self.token_row(row["input_ids"], row["labels"], row.get("sample_metadata"))
        example["pixel_values"] = (decode(image_refs) if memo is None
                                   else memo.pixels(image_refs, image_root, decode, allowed_roots=allowed_roots))
        return example

    def encode_prompt(self, messages: list[dict], images: list) -> dict[str, Any]:
        import torch

        from medtune.models.processing import expand_image_tokens, tokenize_segments
        from medtune.models.templates import get_template, render_with_tokenizer

        segments = render_with_tokenizer(get_template(self.template), messages, self.tokenizer,
                                         add_generation_prompt=True, image_token=self.image_token)
        ids, _ = tokenize_segments(segments, self.tokenizer)
        places = ids.count(self.image_token_id)
        if places != len(images):
            raise ValueError(f"the conversation has {places} image places but {len(images)} images were given")
        ids, _ = expand_image_tokens(ids, ids, self.image_token_id, self.image_tokens_per_image)
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "pixel_values": self.pixel_values(images)}

    def pixel_values(self, images: list):
        """[n_images, 3, H, W] float tensor from PIL images (squared, resized and normalised by the saved image
        processor), or None when there are none."""
        if not images:
            return None
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    # ---- the token cache --------------------------------------------------------------------------------

    def cache_settings(self) -> dict[str, Any]:
        return {"template": self.template, "image_token": self.image_token,
                "image_tokens_per_image": self.image_tokens_per_image, "pad_mode": self.pad_mode,
                "image_size": self.image_size, "sample_metadata": list(self.sample_metadata)}

    # ---- exact speed-ups: a frozen tower's features, once per distinct image -----------------------------

    def exact_speedups(self, *, distributed: bool = False):
        """Beside the labelled-positions head: reuse a frozen tower's features when its output depends on the
        pixels alone (no dropout) and training runs in one process (the cache runs the projector outside the
        engine's wrapped forward; under FSDP or ZeRO-3 a rank that skipped the tower would also leave the others
        waiting in its all-gathers)."""
        speedups = super().exact_speedups(distributed=distributed)
        return dataclasses.replace(speedups, frozen_vision_features=not distributed and _frozen_and_deterministic(
            self.model.model.vision_tower))

    def prepare_training_inputs(self, model, inputs: dict[str, Any], speedups) -> dict[str, Any]:
        """With ``frozen_vision_features``: the tower's selected features come from a cache keyed by each
        image's pixels (computed on a miss), the projector runs on them as in LLaVA's own forward, and the batch
        passes the projected features (``mm_encoder_outputs``) instead of the pixels: the same inputs embeddings,
        the same loss and gradients, without the tower's forward on images seen before."""
        pixels = inputs.get("pixel_values")
        if not speedups.frozen_vision_features or pixels is None:
            return inputs
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if self._features is None:
            self._features = TowerFeatureCache(self.model.model.vision_tower, self.model.config)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        projected = base.model.multi_modal_projector(self._features(pixels))
        out = {key: value for key, value in inputs.items() if key != "pixel_values"}
        out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}
        return out

    # ---- batches ----------------------------------------------------------------------------------------

    def collator(self, *, packing: bool = False, max_length: int | None = None) -> Callable[[list], dict]:
        return KeepVisionBusy(super().collator(packing=packing, max_length=max_length), self.image_token_id,
                              self.image_tokens_per_image, self.image_size, self.tokenizer.pad_token_id)

    def decoder_layers(self):
        """The LLM's decoder layers (each with ``self_attn`` and ``mlp``), e.g. for hooks on an FFN's input."""
        return self.model.model.language_model.layers

    def with_experts(self, settings, *, router_state: dict | None = None, domain_field: str = "modality"):
        """The ``moe`` kind: the same parts in ``medtune_moe_vlm``, the class that records its experts."""
        if self.experts is not None:
            return super().with_experts(settings)
        from medtune.models.kinds import kind_class

        return kind_class("moe").from_dense(self, settings, router_state=router_state, domain_field=domain_field)

    # ---- templates and saving ---------------------------------------------------------------------------

    def use_template(self, name: str) -> None:
        from medtune.models.templates import get_template, stop_token_ids

        jinja = get_template(name).jinja
        self.template = name
        self.tokenizer.chat_template = jinja
        if self.processor is not None:
            self.processor.chat_template = jinja
        self.model.generation_config.eos_token_id = stop_token_ids(name, self.tokenizer)

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "image_tokens_per_image": self.image_tokens_per_image,
                "pad_mode": self.pad_mode}

    # ---- what a person sees -----------------------------------------------------------------------------

    def model_view(self, image):
        """The model's pixels of ``image`` (:meth:`pixel_values`), un-normalised to 8 bits."""
        import torch
        from PIL import Image

        processor = self.image_processor
        values = self.pixel_values([image.convert("RGB")])[0].float()                     # [3, S, S]
        mean = torch.tensor(processor.image_mean).view(3, 1, 1)
        std = torch.tensor(processor.image_std).view(3, 1, 1)
        pixels = ((values * std + mean) / processor.rescale_factor).round().clamp(0, 255).to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).numpy())

    def describe(self) -> list[str]:
        lines = super().describe()
        projector = getattr(self.model.config, "projector_type", None) or "mlp2x_gelu"
        lines.insert(-2, f"projector: {projector}; {self.image_tokens_per_image} image tokens per image, "
                         f"pad mode {self.pad_mode}")
        return lines


def composed_processor(config, tokenizer, image_processor, image_token: str, tokens_per_image: int):
    """The processor plain transformers prepares a composed model's inputs with: a LlavaProcessor, for Llava and
    medtune's own classes alike (they are Llava subclasses; the processor needs only the image token count)."""
    return llava_processor(config, tokenizer, image_processor, image_token, tokens_per_image)


def llava_processor(config, tokenizer, image_processor, image_token: str, tokens_per_image: int):
    """A LlavaProcessor that expands ``image_token`` to exactly ``tokens_per_image`` tokens, so that
    AutoProcessor in plain transformers prepares inputs the same way medtune does."""
    from transformers import LlavaProcessor

    patch_size = config.vision_config.patch_size
    patches = (config.vision_config.image_size // patch_size) ** 2
    # LlavaProcessor counts patches + num_additional_image_tokens, minus one for the "default" strategy.
    dropped = 1 if config.vision_feature_select_strategy == "default" else 0
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          chat_template=tokenizer.chat_template, image_token=image_token,
                          num_additional_image_tokens=tokens_per_image - patches + dropped)


def _frozen_and_deterministic(tower) -> bool:
    """No parameter of the tower trains and nothing random runs in its forward (dropout, attention dropout)."""
    from torch import nn

    if any(parameter.requires_grad for parameter in tower.parameters()):
        return False
    config = tower.config
    if any(getattr(config, name, 0) for name in ("dropout", "attention_dropout", "hidden_dropout_prob",
                                                  "attention_probs_dropout_prob")):
        return False
    return not any(isinstance(module, nn.Dropout) and module.p > 0 for module in tower.modules())


class TowerFeatureCache:
    """The tower's selected features of each distinct image ([patches, width]), computed once and kept.

    Keyed by a digest of the image's pixel values (the same image in two samples decodes to the same pixels),
    up to ``limit_bytes`` of features; beyond that, misses are computed and not kept.
    """

    def __init__(self, tower, config, limit_bytes: int = 2 << 30):
        self.tower, self.config, self.limit_bytes = tower, config, limit_bytes
        self.entries: dict[str, Any] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    def __call__(self, pixel_values):
        import hashlib

        import torch

        keys = [hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                for image in pixel_values]
        first = {key: i for i, key in reversed(list(enumerate(keys)))}   # an image twice in a batch: once
        missing = [i for key, i in first.items() if key not in self.entries]
        computed = {}
        if missing:
            with torch.no_grad():
                features = self._select(self.tower(pixel_values[missing], output_hidden_states=True, return_dict=True))
            for i, feature in zip(missing, features):
                computed[keys[i]] = feature
                if self.bytes + feature.numel() * feature.element_size() <= self.limit_bytes:
                    self.entries[keys[i]] = feature
                    self.bytes += feature.numel() * feature.element_size()
        self.misses += len(missing)   # distinct images computed
        self.hits += len(keys) - len(missing)
        return torch.stack([self.entries.get(key, computed.get(key)) for key in keys])

    def _select(self, outputs):
        """The model's own feature selection (:func:`medtune.models.medtune_vlm.selected_features`)."""
        from medtune.models.medtune_vlm import selected_features

        return selected_features(outputs, self.config)
