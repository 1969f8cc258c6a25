"""Discrete image tokens: the Chameleon/Anole model class medtune trains, a tiny offline preset, and the export to
Chameleon's original format.

* :class:`MedtuneChameleonForConditionalGeneration` is transformers' Chameleon with one change: its forward does
  not overwrite the logits of image-code tokens with the dtype's minimum. transformers' class always does (so a
  plain Chameleon can neither learn nor generate image codes; a masked logit also makes the cross-entropy of an
  image-code label huge, not infinite-looking, so a finite loss proves nothing). It keeps Chameleon's
  ``model_type``, module tree and state-dict keys: its checkpoints are Hugging Face Chameleon checkpoints, which
  plain transformers loads (with image codes masked again, for text generation) and medtune loads with this
  class. Text generation in medtune suppresses image codes explicitly (``suppress_tokens``).
* :func:`image_code_token` names image codes as Chameleon's vocabulary does (the tiny preset,
  :func:`medtune.models.presets.tiny_chameleon`, builds its tokenizer with it).
* :func:`to_chameleon_format` / :func:`from_chameleon_format`: the original checkpoint layout Chameleon's and
  MedMax's own inference code reads (``consolidated.pth`` + ``params.json``; MedMax's ``bin_to_pth`` step). The key
  names and the rotary permutations are those of transformers' Chameleon converter (facts from MedMax's vendored
  ``convert_chameleon_weights_to_hf.py`` and ``src/bin_to_pth.py`` at 20b7055): q/k projections are un-permuted,
  per-head q/k layer norms become one vector (refused when the heads differ, since the original format has one),
  the VQ encoder is left out (Chameleon keeps it in its tokenizer folder as ``vqgan.ckpt``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import ChameleonForConditionalGeneration
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from medtune.errors import UserError

BOI, EOI, END_OF_TURN, IMAGE = "<racm3:break>", "<eoss>", "<reserved08706>", "<image>"
CONSOLIDATED, PARAMS, CONSOLIDATE_PARAMS = "consolidated.pth", "params.json", "consolidate_params.json"


def image_code_token(code: int) -> str:
    """Chameleon's name for image code ``code``: IMGIMG + the code's digits as letters A-J + Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(digit)) for digit in str(code)) + "Z"


class MedtuneChameleonForConditionalGeneration(ChameleonForConditionalGeneration):
    """Chameleon whose image-code logits are left as computed (see the module docstring)."""

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, mm_encoder_outputs=None,
                **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                             position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, mm_encoder_outputs=mm_encoder_outputs, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs[0], logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# ---- Chameleon's original format ------------------------------------------------------------------------------

_TO_ORIGINAL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.q_norm.weight": "attention.q_normalization.weight",
    "self_attn.q_norm.bias": "attention.q_normalization.bias",
    "self_attn.k_norm.weight": "attention.k_normalization.weight",
    "self_attn.k_norm.bias": "attention.k_normalization.bias",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight",
}
_FROM_ORIGINAL = {original: hf for hf, original in _TO_ORIGINAL.items()}


def _rotary_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Original -> Hugging Face: each head's rows from interleaved pairs to two halves (rotate_half rotary)."""
    rows, columns = weight.shape
    return weight.view(heads, rows // heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def _rotary_unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows, columns = weight.shape
    return weight.view(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def _norm_to_original(per_head: torch.Tensor, name: str) -> torch.Tensor:
    """[heads, head_dim] (every head equal, as converted checkpoints are) -> [head_dim] in interleaved order."""
    if not torch.equal(per_head, per_head[:1].expand_as(per_head)):
        raise UserError(f"{name}: the heads' q/k layer norms differ (the model trained them apart); Chameleon's "
                        "original format holds one norm for all heads, so this checkpoint cannot be exported")
    head_dim = per_head.shape[1]
    return per_head[0].view(2, head_dim // 2).t().reshape(head_dim).clone()


def _norm_from_original(vector: torch.Tensor, heads: int) -> torch.Tensor:
    head_dim = vector.shape[0]
    return vector.view(head_dim // 2, 2).t().reshape(1, head_dim).repeat_interleave(heads, 0)


def _mapped(key: str, table: dict[str, str], *, layer_prefix: str, new_prefix: str) -> str | None:
    if key in table:
        return table[key]
    if key.startswith(layer_prefix):
        index, _, rest = key[len(layer_prefix):].partition(".")
        if rest in table:
            return f"{new_prefix}{index}.{table[rest]}"
    return None


def to_chameleon_format(model, out_dir: str | Path) -> Path:
    """Write ``model``'s language weights as Chameleon's ``consolidated.pth`` + ``params.json`` into ``out_dir``."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    original: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if ".vqmodel." in key or key.startswith("model.vqmodel"):
            continue   # the VQ lives in Chameleon's tokenizer folder (vqgan.ckpt)
        new = _mapped(key, _TO_ORIGINAL, layer_prefix="model.layers.", new_prefix="layers.")
        if new is None:
            raise UserError(f"{key}: no place for this weight in Chameleon's original format")
        value = value.detach().cpu()
        if key.endswith("self_attn.q_proj.weight"):
            value = _rotary_unpermute(value, heads)
        elif key.endswith("self_attn.k_proj.weight"):
            value = _rotary_unpermute(value, kv_heads)
        elif ".self_attn.q_norm." in key or ".self_attn.k_norm." in key:
            value = _norm_to_original(value, key)
        original[new] = value.clone()
    original["rope.freqs"] = None   # Chameleon recomputes it, and its loader expects the key (MedMax writes None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / (CONSOLIDATED + ".partial")
    torch.save(original, partial)   # Chameleon's reader expects this torch file; renamed once complete
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": heads,
              **({"n_kv_heads": kv_heads} if kv_heads != heads else {}),   # the converter reads it as GQA
              "vocab_size": config.vocab_size, "norm_eps": config.rms_norm_eps, "rope_theta": _rope_theta(config),
              "qk_normalization": True, "swin_norm": bool(config.swin_norm),
              **_ffn_params(config.hidden_size, config.intermediate_size), "max_seq_len": config.max_position_embeddings}
    (out / PARAMS).write_text(json.dumps({"model": params}, indent=2), encoding="utf-8")
    (out / CONSOLIDATE_PARAMS).write_text(json.dumps({"model_parallel_size": 1}), encoding="utf-8")
    partial.replace(out / CONSOLIDATED)
    return out


def _ffn_params(dim: int, intermediate: int) -> dict[str, Any]:
    """``multiple_of`` (and ``ffn_dim_multiplier`` where needed) that make Chameleon's feed-forward width rule,
    ``multiple_of * ceil(int(multiplier * int(8 * dim / 3)) / multiple_of)``, give ``intermediate``: 256 as
    released where that works (7B: 4096 -> 11008), else the width itself."""
    base = int(8 * dim / 3)
    if 256 * -(-base // 256) == intermediate:
        return {"multiple_of": 256}
    if base <= intermediate:
        return {"multiple_of": intermediate}
    return {"multiple_of": intermediate, "ffn_dim_multiplier": intermediate / base}


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def from_chameleon_format(directory: str | Path, config) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict (without the VQ) of a Chameleon-format folder, for a model with ``config``.

    The torch file is read with ``weights_only=True``: a checkpoint is never allowed to run code.
    """
    path = Path(directory) / CONSOLIDATED
    try:
        original = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:   # an unpicklable object is refused by the safe loader, with its own message
        raise UserError(f"{path}: cannot be read safely as tensors ({error})") from None
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    state: dict[str, torch.Tensor] = {}
    for key, value in original.items():
        if value is None or key == "rope.freqs":   # Chameleon recomputes it (None where MedMax's export wrote it)
            continue
        new = _mapped(key, _FROM_ORIGINAL, layer_prefix="layers.", new_prefix="model.layers.")
        if new is None:
            raise UserError(f"{path}: unknown weight {key!r}")
        if new.endswith("self_attn.q_proj.weight"):
            value = _rotary_permute(value, heads)
        elif new.endswith("self_attn.k_proj.weight"):
            value = _rotary_permute(value, kv_heads)
        elif ".self_attn.q_norm." in new:
            value = _norm_from_original(value, heads)
        elif ".self_attn.k_norm." in new:
            value = _norm_from_original(value, kv_heads)
        state[new] = value
    return state

