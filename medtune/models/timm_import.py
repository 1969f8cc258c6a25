"""A timm Vision Transformer checkpoint as a Hugging Face vision tower: pathology towers such as UNI.

UNI (``MahmoodLab/UNI``) and many other pathology encoders are published in timm's hub format: ``config.json``
with ``architecture`` (``vit_large_patch16_224`` for UNI), ``model_args`` where the model differs from that
architecture's defaults, ``pretrained_cfg`` (normalisation, interpolation), and the weights as timm names them
(``pytorch_model.bin`` or ``model.safetensors``). timm itself does not load here (its dependency torchvision ships
CUDA builds only), and medtune's towers are transformers models, so :func:`import_timm_vit` writes the same
network as transformers' DINOv2 model, which has the same block (pre-norm attention and MLP, each scaled by a
per-channel layer scale and added back), a class token with learned positions, and a final LayerNorm:

* ``cls_token``, ``pos_embed`` (class position first), ``patch_embed.proj`` -> ``embeddings.*``; a fused
  ``attn.qkv`` is split into query, key and value; ``ls1/ls2.gamma`` -> ``layer_scale1/2.lambda1`` (ones where
  the checkpoint has no layer scale); ``norm`` -> ``layernorm``. LayerNorm eps 1e-6 and exact GELU, as timm's ViT.
* The width, depth, patch size, image size (from the position table), MLP width and biases come from the
  weights; the head count from ``model_args.num_heads`` or else the architecture's name (timm's ViT sizes).
* At the trained image size the DINOv2 model returns timm's ``forward_features`` (its ``last_hidden_state``)
  and every block's output (``hidden_states``), tested against timm's own forward on a fixture timm saved.
  Other sizes interpolate the position table (bicubic, as DINOv2 does), which need not equal timm's resampling.
* Refused by name: register tokens, no class token or class position, q/k norms, SwiGLU or other MLPs, an
  attention-pool head, a pre-norm before the blocks, non-ViT architectures.
* The image processor saved beside it normalises with ``pretrained_cfg``'s mean and std at the trained size.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from medtune.errors import SpecError

# timm's ViT sizes by name (vision_transformer.py's model functions): width -> heads
HEADS_BY_NAME = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16, "gigantic": 16}
REFUSED_KEYS = {"reg_token": "register tokens", "attn.q_norm": "q/k normalisation", "mlp.fc1_g": "a SwiGLU MLP",
                "mlp.w12": "a SwiGLU MLP", "attn_pool": "an attention-pool head", "norm_pre": "a norm before the blocks",
                "attn.norm": "a norm inside attention", "mlp.norm": "a norm inside the MLP"}
LAYER_NORM_EPS = 1e-6   # timm's ViT: partial(nn.LayerNorm, eps=1e-6)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def import_timm_vit(source: str | Path, out: str | Path):
    """Write the timm ViT at ``source`` to ``out`` as a transformers DINOv2 model + image processor; returns it."""
    source, out = Path(source), Path(out)
    settings = _timm_config(source)
    architecture = str(settings.get("architecture", ""))
    if not architecture.startswith("vit_"):
        raise SpecError(f"{source}: timm architecture {architecture!r} is not a Vision Transformer (vit_*); medtune "
                        "maps timm ViTs only")
    cfg = settings.get("pretrained_cfg", {})
    return write_dinov2(_read_weights(source), out, heads=_heads(settings, architecture, source), where=source,
                        mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD),
                        bicubic=cfg.get("interpolation", "bicubic") == "bicubic")


def _timm_config(source: Path) -> dict:
    """``source``'s config.json as timm's hub format writes it (``architecture``, no transformers ``model_type``)."""
    path = source / "config.json"
    settings = None
    if path.is_file():
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise SpecError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(settings, dict) or "architecture" not in settings or "model_type" in settings:
        raise SpecError(f"{source}: not a timm checkpoint (a config.json with 'architecture', as timm's hub "
                        "format writes it)")
    return settings


def write_dinov2(weights: dict[str, Any], out: str | Path, *, heads: int, where, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, bicubic: bool = True):
    """timm ViT ``weights`` (timm's names) as a transformers DINOv2 model with ``heads`` heads, saved to ``out`` with
    an image processor normalising by ``mean`` / ``std`` at the trained size; ``where`` names them in errors."""
    from transformers import CLIPImageProcessor, Dinov2Config, Dinov2Model

    for marker, what in REFUSED_KEYS.items():
        if any(marker in key for key in weights):
            raise SpecError(f"{where}: this ViT has {what} ({marker}), which the DINOv2 layout does not hold")
    if "cls_token" not in weights:
        raise SpecError(f"{where}: this ViT has no class token, which the DINOv2 layout requires")
    if "norm.weight" not in weights:
        raise SpecError(f"{where}: this ViT has no final norm (norm.*; a global_pool='avg' model keeps fc_norm "
                        "instead), which the DINOv2 layout ends with")
    expected = ("pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
    absent = [key for key in expected if key not in weights]
    if absent:
        raise SpecError(f"{where}: not the weights of a timm ViT (no {', '.join(absent)})")
    width, depth = weights["cls_token"].shape[-1], 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
    patch = weights["patch_embed.proj.weight"].shape[-1]
    positions = weights["pos_embed"].shape[1] - 1
    side = math.isqrt(positions)
    if side * side != positions:
        raise SpecError(f"{where}: the position table has {positions + 1} rows: not a class position plus a square "
                        "grid (a ViT without a class position, no_embed_class, is not supported)")
    if width % heads:
        raise SpecError(f"{where}: width {width} is not divisible by {heads} attention heads")
    mlp_width = weights["blocks.0.mlp.fc1.weight"].shape[0]
    if mlp_width % width:
        raise SpecError(f"{where}: MLP width {mlp_width} is not a whole multiple of the width {width}, which "
                        "transformers' DINOv2 config requires (mlp_ratio is an integer)")
    config = Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                          mlp_ratio=mlp_width // width, patch_size=patch,
                          image_size=side * patch, layer_norm_eps=LAYER_NORM_EPS, hidden_act="gelu",
                          qkv_bias="blocks.0.attn.qkv.bias" in weights, layerscale_value=1.0, use_swiglu_ffn=False)
    model = Dinov2Model(config).eval()
    state = _dinov2_state(weights, depth, width, model.state_dict())
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out)
    size = side * patch
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(mean), image_std=list(std), resample=3 if bicubic else 2,
                       do_convert_rgb=True).save_pretrained(out)
    return model


def _read_weights(source: Path) -> dict[str, Any]:
    from medtune.models.weights import tensors_named

    for name in ("model.safetensors", "pytorch_model.bin"):   # as timm's hub format names them
        if (source / name).is_file():
            return tensors_named(source / name, "")   # a pickle is read as tensors only
    raise SpecError(f"{source}: no model.safetensors or pytorch_model.bin beside config.json")


def _heads(settings: dict, architecture: str, source: Path) -> int:
    heads = (settings.get("model_args") or {}).get("num_heads")
    if heads is None:
        size = re.match(r"vit_([a-z]+)_", architecture)
        heads = HEADS_BY_NAME.get(size.group(1)) if size else None
    if heads is None:
        raise SpecError(f"{source}: cannot tell the number of attention heads of {architecture!r}; add "
                        "model_args.num_heads to its config.json")
    return int(heads)


def _dinov2_state(weights: dict, depth: int, width: int, template: dict) -> dict:
    import torch

    state = {"embeddings.cls_token": weights["cls_token"], "embeddings.mask_token": torch.zeros_like(
        template["embeddings.mask_token"]), "embeddings.position_embeddings": weights["pos_embed"],
             "embeddings.patch_embeddings.projection.weight": weights["patch_embed.proj.weight"],
             "embeddings.patch_embeddings.projection.bias": weights.get(   # patch_bias=False: none
                 "patch_embed.proj.bias", torch.zeros(width)),
             "layernorm.weight": weights["norm.weight"], "layernorm.bias": weights["norm.bias"]}
    for i in range(depth):
        old, new = f"blocks.{i}.", f"encoder.layer.{i}."
        query, key, value = weights[old + "attn.qkv.weight"].split(width)
        state.update({new + "attention.q_proj.weight": query, new + "attention.k_proj.weight": key,
                      new + "attention.v_proj.weight": value})
        if old + "attn.qkv.bias" in weights:
            q, k, v = weights[old + "attn.qkv.bias"].split(width)
            state.update({new + "attention.q_proj.bias": q, new + "attention.k_proj.bias": k,
                          new + "attention.v_proj.bias": v})
        for timm_name, hf_name in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.o_proj"),
                                   ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for leaf in ("weight", "bias"):
                state[f"{new}{hf_name}.{leaf}"] = weights[f"{old}{timm_name}.{leaf}"]
        for n in (1, 2):
            gamma = weights.get(f"{old}ls{n}.gamma")
            state[f"{new}layer_scale{n}.lambda1"] = gamma if gamma is not None else torch.ones(width)
    missing = sorted(set(template) - set(state))
    unused = sorted(k for k in weights if not k.startswith(("head.", "fc_norm.")) and not _used(k))
    if missing or unused:
        raise SpecError(f"weights the DINOv2 layout lacks: {unused[:6]}; not filled: {missing[:6]}")
    return state


def _used(key: str) -> bool:
    return key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                   "norm.bias") or re.fullmatch(
        r"blocks\.\d+\.(norm[12]\.(weight|bias)|attn\.(qkv|proj)\.(weight|bias)|mlp\.fc[12]\.(weight|bias)|ls[12]\.gamma)",
        key) is not None
