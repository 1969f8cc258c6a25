"""A release in Chameleon's own layout as a medtune checkpoint: MedMax's ``mint-medmax/medmax_7b``, Anole, Chameleon.

The layout: ``models/<size>/consolidated.pth`` + ``params.json`` (+ ``consolidate_params.json``) and
``tokenizer/text_tokenizer.json`` + ``vqgan.yaml`` + ``vqgan.ckpt``. :func:`import_chameleon_release` builds the
discrete kind from it as transformers' Chameleon converter builds the Hugging Face checkpoint (facts from MedMax's
vendored ``convert_chameleon_weights_to_hf.py`` at 20b7055, which made ``mint-medmax/medmax_7b_hf``):
``<reserved08707>`` is renamed ``<image>``; the FFN width follows ``multiple_of`` / ``ffn_dim_multiplier``; 4,096
positions (16,384 when ``rope_theta`` > 10,000); the VQ encoder comes from ``vqgan.ckpt`` (read as tensors only),
``vqgan.yaml``'s names mapped as :data:`VQ_NAMES` says. Unlike the converter it keeps the VQGAN's decoder too
(attached, so the checkpoint answers with images) and uses Chameleon's ``text_tokenizer.json`` as is, as
Chameleon's own inference code does. Tested against the converter's output on a fixture MedMax's code wrote.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medtune.errors import UserError
from medtune.models.chameleon import (CONSOLIDATE_PARAMS, CONSOLIDATED, IMAGE, PARAMS,
                                      MedtuneChameleonForConditionalGeneration, from_chameleon_format)

VQ_NAMES = {"embed_dim": "embed_dim", "n_embed": "num_embeddings", "double_z": "double_latent",
            "z_channels": "latent_channels", "resolution": "resolution", "in_channels": "in_channels",
            "ch": "base_channels", "ch_mult": "channel_multiplier", "num_res_blocks": "num_res_blocks",
            "attn_resolutions": "attn_resolutions", "dropout": "dropout"}


def is_chameleon_release(source: str | Path) -> bool:
    """A folder in Chameleon's release layout: ``models/<size>/consolidated*.pth`` (+ ``tokenizer/``)."""
    return bool(_release_model_dirs(Path(source)))


def _release_model_dirs(root: Path) -> list[Path]:
    return sorted({path.parent for path in root.glob("models/*/consolidated*.pth")})


def import_chameleon_release(source: str | Path, out: str | Path, *, dtype: str = "float32"):
    """Write the Chameleon-layout release at ``source`` (e.g. MedMax's ``mint-medmax/medmax_7b``) to ``out`` as a
    medtune discrete-kind checkpoint with Chameleon's VQGAN decoder attached; returns the kind object."""
    from medtune.models.kinds.discrete import DiscreteVLM
    from medtune.models.vqgan import read_checkpoint_state_dict

    root = Path(source)
    folders = _release_model_dirs(root)
    if len(folders) != 1:
        raise UserError(f"{root}: {len(folders)} model folders under models/ ({', '.join(p.name for p in folders)}); "
                        "import one release at a time")
    folder, tokenizer_dir = folders[0], root / "tokenizer"
    if not (folder / CONSOLIDATED).is_file():
        raise UserError(f"{folder}: a sharded release (consolidated.00.pth ...), which medtune does not read; "
                        "convert it with transformers' Chameleon converter")
    absent = [name for name in ("text_tokenizer.json", "vqgan.yaml", "vqgan.ckpt") if not (tokenizer_dir / name).is_file()]
    if absent:
        raise UserError(f"{root}: a Chameleon release needs tokenizer/{', tokenizer/'.join(absent)} beside models/")
    params = _release_params(folder)
    tokenizer = _release_tokenizer(tokenizer_dir / "text_tokenizer.json")
    config = _release_config(params, folder, tokenizer_dir / "vqgan.yaml", tokenizer)
    state = from_chameleon_format(folder, config)
    vq = read_checkpoint_state_dict(tokenizer_dir / "vqgan.ckpt")
    state.update({f"model.vqmodel.{key}": value for key, value in vq.items() if "decoder" not in key})
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))   # built in the target dtype: a 7B model in fp32 is 28 GB
    try:
        model = MedtuneChameleonForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{root}: the weights do not fill a Chameleon model of params.json's size (missing "
                        f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model = model.to(getattr(torch, dtype)).eval()
    vlm = DiscreteVLM.assemble(model, tokenizer)
    vlm.attach_decoder(tokenizer_dir)
    vlm.save(out)
    return vlm


def _release_params(folder: Path) -> dict[str, Any]:
    """params.json merged as Chameleon's loader merges it (top level, its "model" entry, consolidate_params.json)."""
    params = json.loads((folder / PARAMS).read_text(encoding="utf-8"))
    extra = folder / CONSOLIDATE_PARAMS
    merged = {**params, **params.get("model", {}), **(json.loads(extra.read_text(encoding="utf-8"))
                                                      if extra.is_file() else {})}
    if merged.get("model_parallel_size", 1) != 1:
        raise UserError(f"{folder}: model_parallel_size {merged['model_parallel_size']}: sharded releases "
                        "(consolidated.00.pth ...) are not read; convert them with transformers' converter")
    return merged


def _release_tokenizer(path: Path):
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    settings = json.loads(path.read_text(encoding="utf-8"))
    vocab = settings["model"]["vocab"]
    if "<reserved08707>" in vocab:
        vocab[IMAGE] = vocab.pop("<reserved08707>")
    for token in settings.get("added_tokens", []):
        if token["content"] == "<reserved08707>":
            token["content"] = IMAGE
    backend = Tokenizer.from_str(json.dumps(settings))
    # the converter's LlamaTokenizerFast puts BOS before each text it encodes with special tokens
    bos = ("<s>", backend.token_to_id("<s>"))
    backend.post_processor = TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def _release_config(params: dict, folder: Path, vqgan_yaml: Path, tokenizer):
    import yaml
    from transformers import ChameleonConfig

    vq_params = yaml.safe_load(vqgan_yaml.read_text(encoding="utf-8"))["model"]["params"]
    vq = {**vq_params, **vq_params.get("ddconfig", {})}
    rows = torch.load(folder / CONSOLIDATED, map_location="meta", weights_only=True)["tok_embeddings.weight"].shape[0]
    dim, theta = params["dim"], float(params.get("rope_theta", 10000.0))
    base = int(8 * dim / 3)
    multiple_of, multiplier = params.get("multiple_of", 256), params.get("ffn_dim_multiplier") or 1
    return ChameleonConfig(
        hidden_size=dim, num_hidden_layers=params["n_layers"], num_attention_heads=params["n_heads"],
        num_key_value_heads=params.get("n_kv_heads") or params["n_heads"], rms_norm_eps=params["norm_eps"],
        intermediate_size=multiple_of * -(-int(multiplier * base) // multiple_of), vocab_size=rows,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        max_position_embeddings=16384 if theta > 10000.0 else 4096, swin_norm=bool(params.get("swin_norm")),
        model_parallel_size=1, vocabulary_map=dict(tokenizer.get_vocab()), pad_token_id=None,
        vq_config={new: vq[old] for old, new in VQ_NAMES.items() if old in vq})
