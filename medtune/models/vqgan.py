"""The Chameleon/Anole VQGAN image decoder: image codes (B, 32×32) → RGB pixels (B, 3, 512, 512) in [-1, 1].

transformers' ``ChameleonVQVAE`` is encoder-only (its converter drops the decoder weights), so a Chameleon/Anole
model cannot turn the image codes it generates back into pixels. This module is the missing half of the VQGAN
that Chameleon took from taming-transformers: the code-book lookup, ``post_quant_conv`` and the convolutional
decoder, written so that the decoder half of the released ``tokenizer/vqgan.ckpt`` loads into it by name.

Layout (the released config: embed_dim = z_channels = 256, n_embed 8192, ch 128, ch_mult [1, 1, 2, 2, 4],
num_res_blocks 2, attn_resolutions [], resolution 512, out_ch 3), with state-dict names as in ``vqgan.ckpt``::

    quantize.embedding.weight [8192, 256]                  code book; a code is a row index
    post_quant_conv.{weight [256, 256, 1, 1], bias [256]}
    decoder.conv_in [512, 256, 3, 3]                       at the 32×32 latent resolution
    decoder.mid.block_1, mid.attn_1, mid.block_2           res block, single-head attention, res block, 512 wide
    decoder.up.4: 3 res blocks 512→512, upsample           up.{level}: level 0 is full resolution, so the
    decoder.up.3: 3 res blocks 512→256, upsample             levels run 4 → 0 while decoding (taming's order)
    decoder.up.2: 3 res blocks 256→256, upsample
    decoder.up.1: 3 res blocks 256→128, upsample
    decoder.up.0: 3 res blocks 128→128                     no upsample at the top level
    decoder.norm_out [128], decoder.conv_out [3, 128, 3, 3]

A res block is ``norm1, conv1, norm2, conv2`` (+ a 1×1 ``nin_shortcut`` when the width changes); attention is
``norm, q, k, v, proj_out`` (1×1 convs); ``upsample.conv`` follows a nearest ×2 resize. Every norm is
GroupNorm(32, eps 1e-6). 167 tensors in all (164 under ``decoder.``); ``tests/models/test_vqgan.py`` holds the
full name/shape table, taken from taming-transformers' ``Decoder`` built with this config.

Choices:
- The config is a plain dataclass, not a transformers ``PreTrainedConfig``: this decoder is no Hugging Face
  model (nothing loads it with ``from_pretrained``; its weights come from ``vqgan.ckpt`` or a safetensors file),
  its fields keep the released ``vqgan.yaml`` names so the yaml maps onto it one to one, and ``__post_init__``
  checks them where they are set.
- Per-level attention is built wherever a level's resolution is in ``attn_resolutions``, as taming does. The
  released config lists none and MedMax's fine-tune config lists [16], a size the 32→512 decoder never has, so
  both build attention only in the mid block.
- No tanh at the end: the decoder's raw output is clamped to [-1, 1] by :meth:`ChameleonVQGANDecoder.decode`,
  and :meth:`~ChameleonVQGANDecoder.to_image` truncates to uint8 as Chameleon's own inference code does, so
  saved images match it level for level.
- Checkpoints are read with ``torch.load(weights_only=True)`` only, which rebuilds tensors and plain containers
  and refuses anything else: a Lightning ``.ckpt`` is a pickle, and a full pickle load would run whatever code
  the file names. A file the safe reader refuses must be converted to safetensors where it is trusted.
- Codes are raw code-book indices (0 … n_embed − 1), not language-model token ids: remove the model's
  image-token offset (Chameleon's vocabulary mapping) before decoding.
"""
from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from medtune.errors import SpecError, UserError

GROUP_NORM_GROUPS = 32
# The prefixes of the weights decoding needs; a VQGAN checkpoint also holds encoder.*, quant_conv.* and, when
# saved from training, loss.* (the discriminator and LPIPS), which are left alone.
DECODING_PREFIXES = ("quantize.", "post_quant_conv.", "decoder.")
# vqgan.yaml ddconfig flags that would change the decoder's architecture, with the value this module implements.
_FIXED_DDCONFIG_FLAGS = {"tanh_out": False, "give_pre_end": False, "resamp_with_conv": True,
                         "use_linear_attn": False}


class VQGANCheckpointError(UserError, ValueError):
    """A VQGAN checkpoint that cannot be read safely or does not fit the decoder; the message starts with the file."""


@dataclass
class ChameleonVQGANDecoderConfig:
    """The decoder's hyper-parameters, named as in the released ``vqgan.yaml``; defaults are Chameleon/Anole's."""

    embed_dim: int = 256
    """Width of a code-book vector (``model.params.embed_dim``)."""
    n_embed: int = 8192
    """Number of codes in the code book (``model.params.n_embed``)."""
    z_channels: int = 256
    """Latent channels entering the decoder, after ``post_quant_conv`` (``ddconfig.z_channels``)."""
    ch: int = 128
    """Base width; level i is ``ch * ch_mult[i]`` wide (``ddconfig.ch``)."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Width multiplier per level, full resolution first; each level after the first halves the resolution."""
    num_res_blocks: int = 2
    """Res blocks per encoder level; the decoder has one more per level (``ddconfig.num_res_blocks``)."""
    attn_resolutions: tuple[int, ...] = ()
    """Feature-map sizes that get attention after every res block of their level (the mid block always has it)."""
    resolution: int = 512
    """Output image side in pixels (``ddconfig.resolution``)."""
    out_ch: int = 3
    """Output channels (``ddconfig.out_ch``)."""
    dropout: float = 0.0
    """Dropout inside the res blocks (``ddconfig.dropout``)."""
    attn_type: str = "vanilla"
    """``"vanilla"``: single-head attention in the mid block; ``"none"``: no attention at all."""

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions or ())
        self.attn_type = "none" if self.attn_type is None else str(self.attn_type)
        for name in ("embed_dim", "n_embed", "z_channels", "ch", "num_res_blocks", "resolution", "out_ch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(f"vqgan {name}: must be a positive integer, got {value!r}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise SpecError(f"vqgan ch_mult: must be a non-empty list of positive integers, got {list(self.ch_mult)}")
        for width in (self.ch * m for m in self.ch_mult):
            if width % GROUP_NORM_GROUPS:
                raise SpecError(f"vqgan ch * ch_mult: width {width} is not a multiple of the "
                                f"{GROUP_NORM_GROUPS} GroupNorm groups")
        if self.resolution % self.upsampling_factor:
            raise SpecError(f"vqgan resolution: {self.resolution} is not divisible by the upsampling factor "
                            f"{self.upsampling_factor} of {len(self.ch_mult)} levels")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"vqgan dropout: must be in [0, 1), got {self.dropout}")
        if self.attn_type not in ("vanilla", "none"):
            raise SpecError(f"vqgan attn_type: {self.attn_type!r} is not supported (use 'vanilla' or 'none')")

    @property
    def upsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the code grid: 32 for the released config."""
        return self.resolution // self.upsampling_factor

    @property
    def codes_per_image(self) -> int:
        return self.latent_size ** 2

    @classmethod
    def from_vqgan_yaml(cls, path: str | Path) -> ChameleonVQGANDecoderConfig:
        """Read the released ``vqgan.yaml`` (``model.params`` with ``embed_dim``, ``n_embed``, ``ddconfig``).

        ``yaml.safe_load`` builds plain values only: the ``target`` class the yaml names is never imported, and
        a ``!!python/...`` tag is refused rather than constructed.
        """
        path = Path(path)
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise SpecError(f"{path}: not a plain YAML document ({error.__class__.__name__}: "
                            f"{str(error).splitlines()[0]})") from error
        model = document.get("model") if isinstance(document, dict) else None
        params = model.get("params") if isinstance(model, dict) else None
        if not isinstance(params, dict):
            raise SpecError(f"{path}: no model.params mapping (the layout of Chameleon's tokenizer/vqgan.yaml)")
        return cls.from_vqgan_params(params, source=f"{path}: model.params")

    @classmethod
    def from_vqgan_params(cls, params: Mapping[str, Any],
                          source: str = "model.params") -> ChameleonVQGANDecoderConfig:
        """From the ``model.params`` mapping of a taming-style VQGAN config (``lossconfig`` and the rest ignored)."""
        if params.get("remap") is not None:
            raise SpecError(f"{source}.remap: code remapping is not supported (codes must index the code book)")
        ddconfig = params.get("ddconfig")
        if not isinstance(ddconfig, Mapping):
            raise SpecError(f"{source}.ddconfig: missing (the decoder's hyper-parameters live there)")
        for flag, supported in _FIXED_DDCONFIG_FLAGS.items():
            if ddconfig.get(flag, supported) != supported:
                raise SpecError(f"{source}.ddconfig.{flag}: {ddconfig[flag]!r} is not supported "
                                f"(this decoder implements {flag}={supported})")

        def required(mapping: Mapping[str, Any], key: str, where: str) -> Any:
            if key not in mapping:
                raise SpecError(f"{where}.{key}: missing")
            return mapping[key]

        where = f"{source}.ddconfig"
        return cls(embed_dim=required(params, "embed_dim", source), n_embed=required(params, "n_embed", source),
                   z_channels=required(ddconfig, "z_channels", where), ch=required(ddconfig, "ch", where),
                   ch_mult=required(ddconfig, "ch_mult", where),
                   num_res_blocks=required(ddconfig, "num_res_blocks", where),
                   attn_resolutions=required(ddconfig, "attn_resolutions", where),
                   resolution=required(ddconfig, "resolution", where), out_ch=required(ddconfig, "out_ch", where),
                   dropout=float(ddconfig.get("dropout", 0.0)), attn_type=ddconfig.get("attn_type", "vanilla"))

    @classmethod
    def from_transformers(cls, config: Any) -> ChameleonVQGANDecoderConfig:
        """From a transformers ``ChameleonVQVAEConfig`` (or a ``ChameleonConfig``, whose ``vq_config`` is used).

        That config describes the encoder; the decoder mirrors it, and its output space is the encoder's input
        space, so ``out_ch`` is the encoder's ``in_channels``.
        """
        vq = getattr(config, "vq_config", None) or config
        return cls(embed_dim=vq.embed_dim, n_embed=vq.num_embeddings, z_channels=vq.latent_channels,
                   ch=vq.base_channels, ch_mult=tuple(vq.channel_multiplier), num_res_blocks=vq.num_res_blocks,
                   attn_resolutions=tuple(vq.attn_resolutions or ()), resolution=vq.resolution,
                   out_ch=vq.in_channels, dropout=float(vq.dropout), attn_type=vq.attn_type)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUP_NORM_GROUPS, channels, eps=1e-6)


class VQGANResnetBlock(nn.Module):
    """Pre-norm residual block, (B, in, H, W) → (B, out, H, W): (GroupNorm → SiLU → 3×3 conv) twice."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # Identity holds no weights, so a same-width block has no nin_shortcut key, as in the checkpoint.
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class VQGANSelfAttention(nn.Module):
    """Single-head self-attention over all H·W positions, 1×1-conv projections, a residual; shape-preserving."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        normed = self.norm(x)
        # (B, C, H, W) -> (B, H·W, C); one head spanning all channels, so the default 1/sqrt(C) scale applies
        q, k, v = (proj(normed).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(attended.transpose(1, 2).reshape(batch, channels, height, width))


class VQGANUpsample(nn.Module):
    """Nearest-neighbour ×2 resize, then a 3×3 conv: (B, C, H, W) → (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VQGANMidBlock(nn.Module):
    """Res block, attention, res block at the latent resolution; shape-preserving."""

    def __init__(self, channels: int, dropout: float, attend: bool):
        super().__init__()
        self.block_1 = VQGANResnetBlock(channels, channels, dropout)
        self.attn_1 = VQGANSelfAttention(channels) if attend else nn.Identity()
        self.block_2 = VQGANResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class VQGANUpLevel(nn.Module):
    """One decoder level: res blocks (each followed by attention if ``attend``), then ×2 upsampling if ``upsample``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, dropout: float, attend: bool,
                 upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(VQGANResnetBlock(widths[i], widths[i + 1], dropout) for i in range(num_blocks))
        self.attn = nn.ModuleList(VQGANSelfAttention(out_channels) for _ in range(num_blocks) if attend)
        self.upsample = VQGANUpsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[index](x)
        return self.upsample(x)


class VQGANPixelDecoder(nn.Module):
    """Latents (B, z_channels, h, w) → unclamped pixels (B, out_ch, h·f, w·f), f = 2^(levels − 1)."""

    def __init__(self, config: ChameleonVQGANDecoderConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        attend_mid = config.attn_type == "vanilla"
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = VQGANMidBlock(widths[-1], config.dropout, attend_mid)
        levels: dict[int, VQGANUpLevel] = {}
        channels, size = widths[-1], config.latent_size
        for level in reversed(range(len(widths))):  # built lowest resolution first, the order they run in
            levels[level] = VQGANUpLevel(channels, widths[level], config.num_res_blocks + 1, config.dropout,
                                         attend=attend_mid and size in config.attn_resolutions, upsample=level > 0)
            channels, size = widths[level], size * 2
        # Stored by level (up.0 = full resolution), the order of the names in vqgan.ckpt.
        self.up = nn.ModuleList(levels[level] for level in range(len(widths)))
        self.norm_out = _group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.out_ch, kernel_size=3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(latents))
        for level in reversed(range(len(self.up))):
            h = self.up[level](h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANCodebook(nn.Module):
    """The quantizer's code book (``quantize.embedding.weight``, n_embed × embed_dim); decoding only looks rows up."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)


@dataclass(frozen=True)
class LoadReport:
    """What a weight file held, as seen by the decoder."""

    missing: tuple[str, ...]
    """Decoder weights the file lacks (they keep their current values)."""
    unexpected: tuple[str, ...]
    """Weights under quantize./post_quant_conv./decoder. that this decoder has no place for."""
    ignored: int
    """Other weights (encoder.*, quant_conv.*, loss.*): not needed to decode, left alone."""


def _name_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def read_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or the ``state_dict`` of a torch/Lightning checkpoint, on the CPU.

    A torch checkpoint is unpickled with ``weights_only=True`` and nothing else: a file holding any other object
    (an optimizer class, OmegaConf hyper-parameters, a function) is refused, never executed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"it holds {refused.group(1)}" if refused else str(error).strip().splitlines()[-1]
        raise VQGANCheckpointError(
            f"{path}: refused by torch.load(weights_only=True): {what}, which is not a tensor or plain container. "
            f"medtune never unpickles arbitrary objects; where you trust the file, save its state_dict as "
            f"safetensors and load that.") from error
    state = payload.get("state_dict", payload) if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VQGANCheckpointError(f"{path}: no state_dict of tensors (expected a Lightning checkpoint with a "
                                   f"'state_dict' entry, or a plain state dict)")
    return dict(state)


class ChameleonVQGANDecoder(nn.Module):
    """Image codes → pixels for Chameleon/Anole: code book → ``post_quant_conv`` → ``decoder``.

    Built in eval mode: it is used to decode, and dropout (0 in the released config) must not randomise images.
    """

    def __init__(self, config: ChameleonVQGANDecoderConfig | None = None):
        super().__init__()
        self.config = config or ChameleonVQGANDecoderConfig()
        self.quantize = VQGANCodebook(self.config.n_embed, self.config.embed_dim)
        self.post_quant_conv = nn.Conv2d(self.config.embed_dim, self.config.z_channels, kernel_size=1)
        self.decoder = VQGANPixelDecoder(self.config)
        self.eval()

    @classmethod
    def from_vqgan_files(cls, config_path: str | Path, checkpoint_path: str | Path) -> ChameleonVQGANDecoder:
        """The released pair: ``tokenizer/vqgan.yaml`` and ``tokenizer/vqgan.ckpt`` (or a safetensors copy)."""
        decoder = cls(ChameleonVQGANDecoderConfig.from_vqgan_yaml(config_path))
        decoder.load_checkpoint(checkpoint_path)
        return decoder

    def latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Code-book vectors for ``codes`` (B, h·w) or (B, h, w), row-major: (B, embed_dim, h, w)."""
        side = self.config.latent_size
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype.is_complex \
                or codes.dtype == torch.bool:
            raise TypeError(f"image codes must be an integer tensor, got "
                            f"{codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        if not ((codes.dim() == 2 and codes.shape[1] == side * side)
                or (codes.dim() == 3 and tuple(codes.shape[1:]) == (side, side))):
            raise ValueError(f"image codes must have shape (batch, {side * side}) or (batch, {side}, {side}), "
                             f"got {tuple(codes.shape)}")
        out_of_range = (codes < 0) | (codes >= self.config.n_embed)
        if out_of_range.any():
            first = tuple(int(i) for i in out_of_range.nonzero()[0])
            raise ValueError(f"image code {int(codes[first])} at codes[{', '.join(map(str, first))}] is outside "
                             f"the code book [0, {self.config.n_embed}) ({int(out_of_range.sum())} of "
                             f"{codes.numel()} codes are); pass raw codes, with the language model's image-token "
                             f"offset removed")
        vectors = self.quantize.embedding(codes.to(self.quantize.embedding.weight.device).reshape(-1, side, side))
        return vectors.permute(0, 3, 1, 2).contiguous()

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h·w) or (B, h, w) → unclamped pixels (B, out_ch, resolution, resolution)."""
        return self.decoder(self.post_quant_conv(self.latents(codes)))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, 1024) or (B, 32, 32) → pixels (B, 3, 512, 512) clamped to [-1, 1] (released config sizes)."""
        return self(codes).clamp(-1.0, 1.0)

    @staticmethod
    def to_image(pixels: torch.Tensor) -> list[Image.Image]:
        """Pixels (B, 3, H, W) or (3, H, W) in [-1, 1] → RGB images; values outside are clamped, then truncated
        to uint8 as Chameleon's inference code does (−1 → 0, 1 → 255)."""
        batch = pixels[None] if pixels.dim() == 3 else pixels
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"to_image expects RGB pixels (batch, 3, height, width), got {tuple(pixels.shape)}")
        unit = (batch.detach().float().clamp(-1.0, 1.0) + 1.0) / 2.0
        arrays = (unit.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)
        return [Image.fromarray(array) for array in arrays]

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                     source: str = "state dict") -> LoadReport:
        """Copy the decoding weights of a VQGAN state dict (taming names) into this module.

        Keys outside quantize./post_quant_conv./decoder. are ignored. A shape mismatch always raises; missing or
        unexpected decoding keys raise when ``strict``, and are returned in the report either way.
        """
        own = self.state_dict()
        decoding = {k: v for k, v in state_dict.items() if k.startswith(DECODING_PREFIXES)}
        missing = sorted(set(own) - set(decoding))
        unexpected = sorted(set(decoding) - set(own))
        wrong_shape = [f"{k} {list(decoding[k].shape)} (decoder expects {list(own[k].shape)})"
                       for k in sorted(set(own) & set(decoding)) if decoding[k].shape != own[k].shape]
        if wrong_shape:
            raise VQGANCheckpointError(f"{source}: {len(wrong_shape)} weights have the wrong shape for this "
                                       f"decoder config: {_name_list(wrong_shape)}")
        if strict and (missing or unexpected):
            parts = ([f"{len(missing)} decoder weights missing: {_name_list(missing)}"] if missing else []) + \
                    ([f"{len(unexpected)} unexpected: {_name_list(unexpected)}"] if unexpected else [])
            raise VQGANCheckpointError(f"{source}: " + "; ".join(parts))
        self.load_state_dict({k: decoding[k] for k in own if k in decoding}, strict=False)
        return LoadReport(missing=tuple(missing), unexpected=tuple(unexpected),
                          ignored=len(state_dict) - len(decoding))

    def load_checkpoint(self, path: str | Path, strict: bool = True) -> LoadReport:
        """Load the decoder half of ``vqgan.ckpt`` (a Lightning checkpoint) or of a ``.safetensors`` file."""
        return self.load_weights(read_checkpoint_state_dict(path), strict=strict, source=str(path))
