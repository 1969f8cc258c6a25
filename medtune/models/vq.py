"""VQ image tokenizers: an image becomes a grid of discrete codes (and language-model ids), and codes become images.

One small class per model family behind one interface, :class:`ImageTokenizer`, chosen by :func:`image_tokenizer`
from a loaded transformers model or a checkpoint path. The families and what each one's ids are:

* **chameleon** (ChameleonForConditionalGeneration: Chameleon, Anole, MedMax): MedMax's own preprocessing; the
  LM sees the ids of the model's ``vocabulary_map`` (``IMGIMG…`` tokens), which are MedMax's code + 4 wherever that
  rule holds; no decoder in the checkpoint, one can be attached (``medtune.models.vqgan``).
* **emu3** (Emu3ForConditionalGeneration): a centre square, then Emu3's image processor; the LM sees the
  ``<|visual token NNNNNN|>`` ids (the row-end tokens Emu3 puts after each row are the sequence builder's); native
  decoder.
* **janus** (JanusForConditionalGeneration): Janus's image processor; the LM sees the codes themselves (Janus embeds
  them with its own generation embedding and predicts them with its own head); native decoder.

Choices:

* **Chameleon preprocessing is MedMax's, step by step** (:func:`medmax_preprocess`): alpha blended onto white in
  float64 and truncated to uint8, shortest side resized to the VQ's resolution with LANCZOS and ``round`` for the
  long side, centre crop, ``x / 255 * 2 - 1``. transformers' ChameleonImageProcessor differs in all three (it
  scales by 0.0078, truncates the long side, composites alpha with rounding), which changes codes. The resolution
  comes from the VQ config, so a 32-px test model preprocesses to 32 px.
* **Emu3 gets a fixed square grid.** Emu3 tokenizes at any aspect ratio, but a batch of different sizes is padded
  and padding changes the codes of the smaller images, and a code table needs one length. Images are centre
  cropped to a square and resized to ``image_size`` (default: Emu3's 1:1 generation size, 720 px, clamped into the
  processor's pixel range) with the processor's resampling filter; Emu3's own processor then rescales and
  normalises (its resize leaves that size unchanged; checked when the tokenizer is built).
* **The token-id mapping is the model's own**, never a hard-coded offset: Chameleon's vocabulary map is what
  ``get_image_tokens`` uses and what the checkpoint was trained with. :attr:`ChameleonImageTokenizer.medmax_offset`
  is 4 exactly when that map equals MedMax's ``code + 4`` rule, so a caller can tell whether MedMax's own token
  files apply.
* **Loading from a path reads only the VQ weights** (the ``*vqmodel.*`` tensors of a local safetensors checkpoint,
  a few hundred MB of a 14 GB 7B checkpoint); anything else (a hub name, renamed keys) loads the full model and
  keeps its VQ. The VQ runs in float32 unless asked otherwise: lower precision can flip a nearest-code choice.
* A tokenizer built from a loaded model shares that model's VQ module (no copy); ``device``/``dtype`` move it.
* Every encode runs in eval mode without gradients and is deterministic; codes come back as int64 on the CPU.
* ``fingerprint()`` names everything that decides the codes (family, sizes, preprocessing, a digest of the VQ
  weights), so a resumed tokenize-images run can refuse to mix codes from two models.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from medtune.errors import SpecError, UserError

# MedMax shifts a Chameleon code c to vocabulary id c + 4 (ids 0-3 are <s>, <pad>, </s>, <unk>).
MEDMAX_IMAGE_TOKEN_OFFSET = 4
# Emu3Processor generates 1:1 images over this many pixels (720 x 720); tokenized images use the same grid.
EMU3_GENERATION_AREA = 518_400


class NoImageTokenizerError(UserError, ValueError):
    """The model has no VQ image tokenizer medtune knows (the message names the model and the known families)."""


class NoDecoderError(UserError, ValueError):
    """Codes cannot become pixels: the tokenizer has no decoder (Chameleon without an attached VQGAN decoder)."""


class CodeRangeError(ValueError):
    """Image codes outside ``[0, codebook_size)`` or ids that are no image token: a model or data bug."""


# ------------------------------------------------------------------------------------------ MedMax preprocessing

def flatten_alpha_on_white(image: Image.Image) -> Image.Image:
    """RGB as MedMax makes it: RGB passes; without transparency a plain conversion; else alpha blended onto white
    in float64 and truncated to uint8 (PIL's ``alpha_composite`` rounds instead, one level apart)."""
    if image.mode == "RGB":
        return image
    rgba = np.asarray(image.convert("RGBA"))
    if (rgba[..., 3] == 255).all():
        return image.convert("RGB")
    alpha = rgba[..., 3:] / 255.0
    blended = (1.0 - alpha) * 255.0 + alpha * rgba[..., :3]
    return Image.fromarray(blended.astype(np.uint8), "RGB")


def medmax_resize_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shortest side ``size`` and the other ``round``-ed (not truncated) to keep the ratio."""
    scale = size / min(width, height)
    return round(scale * width), round(scale * height)


def medmax_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The centred ``size`` x ``size`` box (left, top, right, bottom), offsets rounded down."""
    left, top = (width - size) // 2, (height - size) // 2
    return left, top, left + size, top + size


def medmax_preprocess(image: Image.Image, size: int = 512) -> torch.Tensor:
    """One image -> float32 pixels (3, size, size) in [-1, 1], exactly as MedMax prepares images for Chameleon's VQ."""
    rgb = flatten_alpha_on_white(image)
    rgb = rgb.resize(medmax_resize_size(*rgb.size, size), Image.LANCZOS)
    rgb = rgb.crop(medmax_crop_box(*rgb.size, size))
    array = np.asarray(rgb) / 255.0 * 2 - 1  # float64 as MedMax computes it, float32 at the end
    return torch.from_numpy(array).permute(2, 0, 1).float()


# --------------------------------------------------------------------------------------------------- interface

def check_codes(codes: torch.Tensor, codebook_size: int) -> None:
    """Raise :class:`CodeRangeError` naming the first code outside ``[0, codebook_size)``."""
    bad = (codes < 0) | (codes >= codebook_size)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise CodeRangeError(f"image code {int(codes[where])} at {list(where)} is outside the code book "
                             f"[0, {codebook_size}) ({int(bad.sum())} of {codes.numel()} codes are)")


class ImageTokenizer(ABC):
    """Images <-> codes (B, codes_per_image), row-major over a ``grid`` (rows, columns) of code-book indices."""

    family: str

    def __init__(self, vq: torch.nn.Module, *, codebook_size: int, grid: tuple[int, int], image_size: int):
        self.vq = vq.eval()
        self.codebook_size = int(codebook_size)
        self.grid = (int(grid[0]), int(grid[1]))
        self.image_size = int(image_size)

    @property
    def codes_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def device(self) -> torch.device:
        return next(self.vq.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vq.parameters()).dtype

    @abstractmethod
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> float32 pixels (B, 3, image_size, image_size), the family's own preprocessing."""

    @abstractmethod
    def _vq_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels on the VQ's device and dtype -> codes of any shape with B * codes_per_image elements."""

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, 3, S, S) -> codes (B, codes_per_image), int64 on the CPU."""
        with torch.no_grad():
            codes = self._vq_codes(pixels.to(self.device, self.dtype))
        codes = codes.reshape(pixels.shape[0], -1).long().cpu()
        if codes.shape[1] != self.codes_per_image:
            raise SpecError(f"{self.family} VQ gave {codes.shape[1]} codes per image, expected {self.grid[0]}x"
                            f"{self.grid[1]} = {self.codes_per_image} for {self.image_size}-px images")
        return codes

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> codes (B, codes_per_image): batched, deterministic, no gradients."""
        if not images:
            return torch.empty(0, self.codes_per_image, dtype=torch.long)
        return self.encode_pixels(self.preprocess(images))

    @abstractmethod
    def codes_to_token_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (any shape) -> the ids the language model sees for them (same shape)."""

    @abstractmethod
    def token_ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Image-token ids (any shape) -> codes; an id that is no image token raises :class:`CodeRangeError`."""

    @property
    def has_decoder(self) -> bool:
        return True

    def decode(self, codes: torch.Tensor) -> list[Image.Image]:
        """Codes (B, codes_per_image) -> RGB images of ``image_size`` pixels."""
        codes = torch.as_tensor(codes).long().reshape(-1, self.codes_per_image)
        check_codes(codes, self.codebook_size)
        with torch.no_grad():
            return self._decode(codes)

    def _decode(self, codes: torch.Tensor) -> list[Image.Image]:
        raise NoDecoderError(f"{self.family} tokenizer has no image decoder")

    def settings(self) -> dict[str, Any]:
        """What besides the weights decides the codes (recorded by :meth:`fingerprint`)."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """Family, sizes, preprocessing settings and a SHA-256 of the VQ weights: equal fingerprints, equal codes."""
        return {"family": self.family, "codebook_size": self.codebook_size, "grid": list(self.grid),
                "image_size": self.image_size, "settings": self.settings(), "weights": _state_digest(self.vq)}


def _state_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _lookup_table(mapping: dict[int, int], size: int, what: str) -> torch.Tensor:
    """Dense int64 table ``table[key] = value``, -1 where ``mapping`` has no key."""
    table = torch.full((size,), -1, dtype=torch.long)
    keys = torch.tensor(sorted(mapping), dtype=torch.long)
    if len(keys) and (keys.min() < 0 or keys.max() >= size):
        raise SpecError(f"{what}: keys outside 0..{size - 1}")
    table[keys] = torch.tensor([mapping[int(k)] for k in keys], dtype=torch.long)
    return table


class _MappedIds:
    """An image-code <-> vocabulary-id mapping held as two dense tables."""

    def __init__(self, img2bpe: dict[int, int], codebook_size: int, family: str):
        missing = [code for code in range(codebook_size) if code not in img2bpe]
        if missing:
            raise SpecError(f"{family} vocabulary maps {codebook_size - len(missing)} of the {codebook_size} image "
                            f"codes to tokens (first missing code: {missing[0]})")
        self.codebook_size = codebook_size
        self.to_ids = _lookup_table({c: img2bpe[c] for c in range(codebook_size)}, codebook_size, family)
        self.to_codes = _lookup_table({v: c for c, v in enumerate(self.to_ids.tolist())},
                                      int(self.to_ids.max()) + 1, family)

    def ids(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes).long()
        check_codes(codes, self.codebook_size)
        return self.to_ids[codes.cpu()].to(codes.device)

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids).long()
        inside = (ids >= 0) & (ids < len(self.to_codes))
        codes = torch.full_like(ids.cpu(), -1)
        codes[inside.cpu()] = self.to_codes[ids.cpu()[inside.cpu()]]
        if (codes < 0).any():
            where = tuple(int(i) for i in (codes < 0).nonzero()[0])
            raise CodeRangeError(f"id {int(ids[where])} at {list(where)} is not an image token of this vocabulary")
        return codes.to(ids.device)


# ---------------------------------------------------------------------------------------------------- families

class ChameleonImageTokenizer(ImageTokenizer):
    """Chameleon / Anole / MedMax: MedMax preprocessing, the encoder-only ``ChameleonVQVAE``, an optional decoder.

    ``decoder``: any object with ``decode(codes (B, n)) -> pixels (B, 3, H, W) in [-1, 1]`` and
    ``to_image(pixels) -> list[PIL.Image]`` (``medtune.models.vqgan.ChameleonVQGANDecoder``).
    """

    family = "chameleon"

    def __init__(self, vq: torch.nn.Module, vocabulary_map: dict[str, int], decoder: Any = None):
        config = vq.config
        side = config.resolution // 2 ** (len(config.channel_multiplier) - 1)
        super().__init__(vq, codebook_size=config.num_embeddings, grid=(side, side), image_size=config.resolution)
        from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

        self.mapping = _MappedIds(ChameleonImageVocabularyMapping(vocabulary_map).img2bpe, self.codebook_size,
                                  self.family)
        medmax = torch.arange(self.codebook_size) + MEDMAX_IMAGE_TOKEN_OFFSET
        self.medmax_offset = MEDMAX_IMAGE_TOKEN_OFFSET if torch.equal(self.mapping.to_ids, medmax) else None
        self.decoder = decoder

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([medmax_preprocess(image, self.image_size) for image in images])

    def _vq_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(pixels, return_dict=True).image_tokens

    def codes_to_token_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return self.mapping.ids(codes)

    def token_ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mapping.codes(ids)

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def _decode(self, codes: torch.Tensor) -> list[Image.Image]:
        if self.decoder is None:
            raise NoDecoderError(
                "Chameleon/Anole checkpoints in Hugging Face format carry no VQ decoder (transformers' "
                "ChameleonVQVAE is encoder-only): attach one, e.g. image_tokenizer(model, decoder="
                "ChameleonVQGANDecoder.from_vqgan_files('tokenizer/vqgan.yaml', 'tokenizer/vqgan.ckpt')) "
                "from medtune.models.vqgan")
        return list(self.decoder.to_image(self.decoder.decode(codes)))

    def settings(self) -> dict[str, Any]:
        return {"preprocessing": "medmax", "resample": "lanczos"}


class Emu3ImageTokenizer(ImageTokenizer):
    """Emu3: a centre square at ``image_size``, Emu3's image processor, ``Emu3VQVAE`` encoder and decoder."""

    family = "emu3"

    def __init__(self, vq: torch.nn.Module, vocabulary_map: dict[str, int], image_processor: Any,
                 image_size: int | None = None):
        factor = 2 ** (len(vq.config.channel_multiplier) - 1)
        size = image_size or _emu3_default_size(image_processor, factor)
        _check_emu3_size(image_processor, size, factor)
        super().__init__(vq, codebook_size=vq.config.codebook_size, grid=(size // factor, size // factor),
                         image_size=size)
        from transformers.models.emu3.modeling_emu3 import Emu3ImageVocabularyMapping

        self.image_processor = image_processor
        self.mapping = _MappedIds(Emu3ImageVocabularyMapping(vocabulary_map).img2bpe, self.codebook_size,
                                  self.family)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        resample = Image.Resampling(int(self.image_processor.resample))
        squares = [_centre_square(image.convert("RGB")).resize((self.image_size,) * 2, resample) for image in images]
        return self.image_processor(squares, return_tensors="pt")["pixel_values"].float()

    def _vq_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        sizes = torch.tensor([[self.image_size, self.image_size]] * pixels.shape[0])
        return torch.stack(self.vq.encode(pixels, image_sizes=sizes, return_dict=True).image_tokens)

    def codes_to_token_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return self.mapping.ids(codes)

    def token_ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mapping.codes(ids)

    def _decode(self, codes: torch.Tensor) -> list[Image.Image]:
        pixels = self.vq.decode(codes.view(-1, *self.grid).to(self.device))
        return _postprocessed(self.image_processor, pixels)

    def settings(self) -> dict[str, Any]:
        return {"preprocessing": "centre-square+emu3", "processor": _processor_settings(self.image_processor)}


class JanusImageTokenizer(ImageTokenizer):
    """Janus: Janus's image processor (longest side, pad to square), ``JanusVQVAE`` encoder and decoder.

    Janus feeds image codes to its language model through a separate generation embedding and predicts them
    with a separate head, so the ids the model sees are the codes themselves.
    """

    family = "janus"

    def __init__(self, vq: torch.nn.Module, image_processor: Any):
        size = _square_size(image_processor)
        factor = 2 ** (len(vq.config.channel_multiplier) - 1)
        grid = tuple(vq.quantize.quant_state_dims)
        if size // factor != grid[0] or size % factor:
            raise SpecError(f"janus: {size}-px images give {size // factor}x{size // factor} codes but the VQ "
                            f"decodes {grid[0]}x{grid[1]}; use an image processor of {grid[0] * factor} px")
        super().__init__(vq, codebook_size=vq.config.num_embeddings, grid=grid, image_size=size)
        self.image_processor = image_processor

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rgb = [image.convert("RGB") for image in images]
        return self.image_processor(rgb, return_tensors="pt")["pixel_values"].float()

    def _vq_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(pixels, return_dict=True).image_tokens

    def codes_to_token_ids(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes).long()
        check_codes(codes, self.codebook_size)
        return codes.clone()

    def token_ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids).long()
        check_codes(ids, self.codebook_size)
        return ids.clone()

    def _decode(self, codes: torch.Tensor) -> list[Image.Image]:
        return _postprocessed(self.image_processor, self.vq.decode(codes.to(self.device)))

    def settings(self) -> dict[str, Any]:
        return {"preprocessing": "janus", "processor": _processor_settings(self.image_processor)}


def _centre_square(image: Image.Image) -> Image.Image:
    side = min(image.size)
    return image.crop(medmax_crop_box(*image.size, side))


def _emu3_default_size(processor: Any, factor: int) -> int:
    """Emu3's 1:1 generation side, clamped into the processor's pixel range, a multiple of the VQ's factor."""
    low = math.ceil(math.sqrt(processor.min_pixels) / factor) * factor
    high = math.floor(math.sqrt(processor.max_pixels) / factor) * factor
    side = round(math.sqrt(EMU3_GENERATION_AREA) / factor) * factor
    return max(low, min(high, side))


def _check_emu3_size(processor: Any, size: int, factor: int) -> None:
    from transformers.models.emu3.image_processing_emu3 import smart_resize

    resized = smart_resize(size, size, factor=processor.spatial_factor, min_pixels=processor.min_pixels,
                           max_pixels=processor.max_pixels)
    if size % factor or resized != (size, size):
        raise SpecError(f"emu3: image_size {size} must be a multiple of the VQ's factor {factor} that the image "
                        f"processor keeps (it would resize {size}x{size} to {resized[0]}x{resized[1]})")


def _square_size(processor: Any) -> int:
    size = processor.size
    height, width = (size.get("height"), size.get("width")) if isinstance(size, dict) else (size.height, size.width)
    if not height or height != width:
        raise SpecError(f"image processor size {size} is not a square")
    return int(height)


def _postprocessed(processor: Any, pixels: torch.Tensor) -> list[Image.Image]:
    """The processor's inverse (un-normalise, rescale, uint8) on (B, 3, H, W) pixels -> PIL images."""
    arrays = list(pixels.detach().float().cpu().numpy())
    images = processor.postprocess(arrays, return_tensors="PIL.Image.Image")["pixel_values"]
    return list(images)


def _processor_settings(processor: Any) -> dict[str, Any]:
    """The processor's JSON settings, for fingerprints (an unserialisable value becomes its repr)."""
    return json.loads(json.dumps(processor.to_dict(), sort_keys=True, default=repr))


# ---------------------------------------------------------------------------------------------------- dispatch

@dataclass(frozen=True)
class _Family:
    """How one family is recognised (its transformers config class), loaded and wrapped."""

    name: str
    config_class: str
    model_class: str
    vq_class: str
    build: Callable[..., ImageTokenizer]  # (vq, config, image_processor, options) -> tokenizer


def _build_chameleon(vq, config, image_processor, options) -> ImageTokenizer:
    if not config.vocabulary_map:
        raise SpecError("chameleon config has no vocabulary_map, so image codes have no token ids")
    return ChameleonImageTokenizer(vq, config.vocabulary_map, decoder=options.get("decoder"))


def _build_emu3(vq, config, image_processor, options) -> ImageTokenizer:
    from transformers import Emu3ImageProcessor

    processor = image_processor or Emu3ImageProcessor(spatial_factor=2 ** (len(vq.config.channel_multiplier) - 1))
    return Emu3ImageTokenizer(vq, config.vocabulary_map, processor, image_size=options.get("image_size"))


def _build_janus(vq, config, image_processor, options) -> ImageTokenizer:
    from transformers import JanusImageProcessorPil

    side = config.vision_config.image_size
    processor = image_processor or JanusImageProcessorPil(size={"height": side, "width": side})
    return JanusImageTokenizer(vq, processor)


# The one place that knows which models have a VQ image tokenizer.
FAMILIES = (
    _Family("chameleon", "ChameleonConfig", "ChameleonForConditionalGeneration", "ChameleonVQVAE", _build_chameleon),
    _Family("emu3", "Emu3Config", "Emu3ForConditionalGeneration", "Emu3VQVAE", _build_emu3),
    _Family("janus", "JanusConfig", "JanusForConditionalGeneration", "JanusVQVAE", _build_janus),
)


def _family_of(config: Any, what: str) -> _Family:
    import transformers

    for family in FAMILIES:
        if isinstance(config, getattr(transformers, family.config_class)):
            return family
    known = ", ".join(f"{f.name} ({f.model_class})" for f in FAMILIES)
    raise NoImageTokenizerError(f"{what} ({type(config).__name__}) has no VQ image tokenizer medtune knows; "
                                f"known families: {known}")


def image_tokenizer(model_or_path: Any, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    image_processor: Any = None, image_size: int | None = None, decoder: Any = None
                    ) -> ImageTokenizer:
    """The VQ image tokenizer of a loaded transformers model or of a checkpoint (folder or hub name).

    ``device``/``dtype``: where the VQ runs; a checkpoint loads on the CPU in float32 unless told, a loaded model's
    VQ stays where it is unless told (it is shared with the model, so moving it moves that part of the model).
    ``image_processor``: Emu3/Janus only; default the checkpoint's own, else the family's defaults at the model's
    size. ``image_size``: Emu3's square side. ``decoder``: Chameleon's pixel decoder (see ChameleonImageTokenizer).
    """
    options = {"image_size": image_size, "decoder": decoder}
    if isinstance(model_or_path, (str, os.PathLike)):
        source = str(model_or_path)
        config = _load_config(source)
        family = _family_of(config, source)
        vq = _load_vq(source, config, family)
        vq = vq.to(device=device or "cpu", dtype=dtype or torch.float32)
    else:
        model = model_or_path
        config = getattr(model, "config", None)
        family = _family_of(config, type(model).__name__)
        vq = _find_vq(model, family)
        if device is not None or dtype is not None:
            vq = vq.to(device=device, dtype=dtype)
        source = getattr(config, "_name_or_path", "") or ""
    if family.name != "chameleon" and image_processor is None:
        image_processor = _checkpoint_image_processor(source)
    return family.build(vq, config, image_processor, options)


def _load_config(source: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise UserError(f"{source}: cannot read a model config ({error})") from error


def _find_vq(model: Any, family: _Family) -> torch.nn.Module:
    """The VQ module of a loaded model: ``model.vqmodel`` or ``model.model.vqmodel`` (PEFT wrappers unwrapped)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    for owner in (model, getattr(model, "model", None)):
        vq = getattr(owner, "vqmodel", None)
        if isinstance(vq, torch.nn.Module):
            return vq
    raise NoImageTokenizerError(f"{type(model).__name__} has a {family.name} config but no VQ module (vqmodel)")


def _load_vq(source: str, config: Any, family: _Family) -> torch.nn.Module:
    """The VQ with its weights: read alone from a local safetensors checkpoint, else taken from the full model."""
    import transformers

    vq = getattr(transformers, family.vq_class)._from_config(config.vq_config)
    weights = _vq_weights(Path(source)) if Path(source).is_dir() else None
    if weights:
        expected = vq.state_dict()
        if set(weights) == set(expected) and all(weights[k].shape == expected[k].shape for k in expected):
            vq.load_state_dict(weights)
            return vq.eval()
    model = getattr(transformers, family.model_class).from_pretrained(source, dtype=torch.float32)
    return _find_vq(model, family).eval()


def _vq_weights(folder: Path) -> dict[str, torch.Tensor] | None:
    """``{name inside the VQ: tensor}`` for every ``…vqmodel.`` tensor of a safetensors checkpoint, or None."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    weights = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():
                head, sep, rest = key.partition("vqmodel.")
                if sep and (not head or head.endswith(".")):
                    weights[rest] = handle.get_tensor(key)
    return weights or None


def _checkpoint_image_processor(source: str) -> Any:
    """A local checkpoint's own image processor (preprocessor_config.json), or None."""
    if not source or not (Path(source) / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(source)


__all__ = [
    "ChameleonImageTokenizer", "CodeRangeError", "Emu3ImageTokenizer", "FAMILIES", "ImageTokenizer",
    "JanusImageTokenizer", "MEDMAX_IMAGE_TOKEN_OFFSET", "NoDecoderError", "NoImageTokenizerError", "check_codes",
    "flatten_alpha_on_white", "image_tokenizer", "medmax_crop_box", "medmax_preprocess", "medmax_resize_size",
]
