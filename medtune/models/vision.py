"""Vision towers: load any Hugging Face vision encoder by config or checkpoint, and describe its output.

A tower is named either by a checkpoint (hub name or local path; a full CLIP/SigLIP checkpoint works,
its vision half is taken) or by a config dict with a ``model_type`` (e.g. ``clip_vision_model``,
``siglip_vision_model``). We never key behaviour on model names: how many tokens a tower emits (patches,
plus a CLS or register tokens or not) is measured by running it once on a blank image.

The image processor a composed model preprocesses with, and saves, is :func:`squaring_image_processor`: the
tower's normalisation with the ``pad_mode`` that makes an image square, in transformers' own
LlavaImageProcessor, so that plain transformers and vLLM compute the pixels medtune trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.errors import SpecError

# Normalisation statistics when a tower comes from a bare config (no preprocessor_config.json to read).
# Facts from the original releases: OpenAI CLIP's training statistics; SigLIP normalises to [-1, 1].
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
PAD_MODES = ("pad", "resize", "crop")


@dataclass(frozen=True)
class TowerLayout:
    """What a vision tower emits for one image at the feature layer in use."""

    num_patches: int        # (image_size // patch_size) ** 2
    num_extra_tokens: int   # tokens that are not patches (1 for CLIP's CLS, 0 for SigLIP)
    num_hidden_states: int  # embeddings + one per layer: valid feature layers are -n .. n-1


def vision_config(source: str | dict[str, Any], image_size: int | None = None):
    """The vision sub-config named by ``source``; ``image_size`` overrides a config dict's size."""
    from transformers import AutoConfig

    if isinstance(source, dict):
        settings = dict(source)
        model_type = settings.pop("model_type", None)
        if not model_type:
            raise SpecError(f"vision config dict needs a model_type (e.g. clip_vision_model): {source}")
        if image_size is not None:
            settings["image_size"] = image_size
        return AutoConfig.for_model(model_type, **settings)
    config = AutoConfig.from_pretrained(source)
    # A full CLIP/SigLIP checkpoint carries text and vision configs; the tower is the vision half.
    config = getattr(config, "vision_config", None) or config
    if image_size is not None and getattr(config, "image_size", image_size) != image_size:
        raise SpecError(f"vision tower {source} was trained at image_size {config.image_size}, not {image_size}; "
                         "leave image_size unset or pick a tower trained at that size")
    return config


def load_vision_tower(source: str | dict[str, Any], config, dtype: str = "float32"):
    """The tower module: pretrained weights for a checkpoint, random initialisation for a config dict."""
    import torch
    from transformers import AutoModel

    if isinstance(source, dict):
        return AutoModel.from_config(config)
    # Passing the vision sub-config selects the vision-only class; its weight names are those of the
    # vision half of a full checkpoint, so the text half is simply left unused.
    return AutoModel.from_pretrained(source, config=config, dtype=getattr(torch, dtype))


def measure_layout(tower, config) -> TowerLayout:
    """Run the tower once on a blank image to count the tokens it emits per image."""
    import torch

    size, patch = config.image_size, config.patch_size
    parameter = next(tower.parameters())
    blank = torch.zeros(1, getattr(config, "num_channels", 3), size, size, dtype=parameter.dtype,
                        device=parameter.device)
    with torch.no_grad():
        hidden_states = tower(pixel_values=blank, output_hidden_states=True).hidden_states
    num_patches = (size // patch) ** 2
    return TowerLayout(num_patches, hidden_states[-1].shape[1] - num_patches, len(hidden_states))


def image_processor_for(source: str | dict[str, Any], config, image_mean=None, image_std=None):
    """The image processor saved with the model: the checkpoint's own when it has one, else built offline."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    size = config.image_size
    if isinstance(source, str) and image_mean is None and image_std is None:
        local = Path(source) / "preprocessor_config.json"
        if local.exists() or not Path(source).exists():
            from transformers import AutoImageProcessor
            try:
                return AutoImageProcessor.from_pretrained(source)
            except OSError:
                pass  # a checkpoint without a preprocessor: build one below from the config
    # SigLIP-style towers (no CLS token) resize to a square; CLIP-style resize the short side and crop.
    if config.model_type.startswith("siglip"):
        return SiglipImageProcessorPil(size={"height": size, "width": size},
                                       image_mean=list(image_mean or SIGLIP_MEAN),
                                       image_std=list(image_std or SIGLIP_STD))
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_mean=list(image_mean or CLIP_MEAN), image_std=list(image_std or CLIP_STD))


def squaring_image_processor(tower_processor, pad_mode: str, image_size: int):
    """The image processor medtune preprocesses with and saves: the tower's normalisation (mean, std, rescale
    factor, resampling) and ``pad_mode``'s way of making an image square, in transformers' LlavaImageProcessor:

    - ``pad``: LLaVA's expand2square (``do_pad``): the image centred on a square filled with ``int(mean * 255)``
      (LLaVA, LLaVA-Med and Med-MoE's (122, 116, 104) for CLIP's mean), then resized to ``image_size``;
    - ``crop``: the short side resized to ``image_size`` (long side truncated to whole pixels), centre-cropped
      (CLIP's own preprocessing);
    - ``resize``: squashed to ``image_size`` x ``image_size`` (SigLIP's).

    Returns ``tower_processor`` itself when it already is that processor (one loaded from a medtune checkpoint).
    The class follows transformers' backend choice (torchvision where it is installed, PIL otherwise), as
    ``AutoImageProcessor`` makes it from the saved file, so medtune and plain transformers agree bit for bit in
    one environment; the two backends differ by a few 8-bit levels (docs/serving.md).
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {', '.join(PAD_MODES)}, got {pad_mode!r}")
    square = {"height": image_size, "width": image_size}
    processor = _llava_image_processor_class()(
        do_pad=pad_mode == "pad", do_resize=True,
        size=square if pad_mode == "resize" else {"shortest_edge": image_size},
        do_center_crop=pad_mode != "resize", crop_size=square,
        resample=tower_processor.resample, do_rescale=True, rescale_factor=tower_processor.rescale_factor,
        do_normalize=True, image_mean=list(tower_processor.image_mean), image_std=list(tower_processor.image_std),
        do_convert_rgb=True)
    if type(tower_processor) is type(processor) and tower_processor.to_dict() == processor.to_dict():
        return tower_processor
    return processor


def pad_mode_of(image_processor) -> str | None:
    """The pad mode a :func:`squaring_image_processor` implements; None for any other image processor."""
    if not type(image_processor).__name__.startswith("LlavaImageProcessor"):
        return None
    if image_processor.do_pad:
        return "pad"
    return "crop" if image_processor.do_center_crop else "resize"


def _llava_image_processor_class():
    """LlavaImageProcessor of the backend ``AutoImageProcessor`` would pick in this environment."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers.models.llava.image_processing_llava import LlavaImageProcessor

        return LlavaImageProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil
