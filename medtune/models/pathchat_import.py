"""``medtune model import`` for checkpoints of PathChat's training code (fedshyvana/pathology_mllm_training).

That code is LLaVA 1.1.3 with a pathology tower and PathChat's projector (facts from its 71b63ad:
``multimodal_encoder/coca_encoder.py``, ``multimodal_projector/builder.py`` and ``coca_attentional_pooler.py``,
``model/builder.py``, ``llava_arch.py``):

* The tower ``coca_vit-l`` is timm's ``vit_large_patch16_224`` (16 heads) with layer scale, at the config's image
  size, read through ``forward_features``: the final LayerNorm's output, class token included
  (``mm_vision_select_feature: patch`` keeps every token for this tower; only ``mm_vision_select_layer: -1``
  exists). Its weights are ``vision_tower.pt`` beside the checkpoint, which the builder loads after building the
  tower. It becomes transformers' DINOv2 model (:mod:`medtune.models.timm_import`) read as
  ``vision_feature_source: last_hidden_state`` with every token (``cls_patch``). Its processor normalises with
  ImageNet's mean and std.
* ``attn_pool+mlp2x_gelu``: 128 learned queries of width ``mm_hidden_size`` attend, with 8 heads and no biases,
  over the tower's tokens (width ``mm_context_size``), after a LayerNorm on each; then a LayerNorm and LLaVA's
  two-layer GELU MLP. It maps onto medtune's attention pool with ``projector_query_width``: ``query`` ->
  ``queries``, ``ln_q`` / ``ln_k`` -> ``query_norm`` / ``context_norm``, ``to_q`` and ``to_kv`` (keys then values)
  -> the attention's q / k / v projections and ``to_out`` -> its output projection (their biases zero), ``ln`` ->
  ``output_norm``, ``proj.0`` / ``proj.2`` -> ``mlp.linear_1`` / ``linear_2``.
* The LM, tokenizer and conversation modes are LLaVA 1.1.3's (:mod:`medtune.models.llava_import`); its
  conversation modes are ``llava_llama_2`` (the default, which PathChat's fine-tuning uses) and ``plain``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from medtune.errors import SpecError
from medtune.models.llava_import import (SQUARING, _language_model, _tokenizer_as_loaded, checkpoint_config,
                                         local_folder, quiet_transformers)

PROJECTOR = "attn_pool+mlp2x_gelu"
TOWERS = {"coca_vit-l": 16}   # tower name -> attention heads (timm's ViT-L)
POOL_HEADS = 8                # AttentionalPoolProjector's n_head, which the builder leaves at its default
TOWER_WEIGHTS = "vision_tower.pt"


def is_pathchat(source: str | Path) -> bool:
    path = Path(source) / "config.json"
    if not path.is_file():
        return False
    _, raw = checkpoint_config(Path(source))
    return str(raw.get("mm_projector_type", "")).startswith("attn_pool")


def import_pathchat(source: str | Path, out: str | Path, *, conv_mode: str | None = None, dtype: str = "float32"):
    """Write the medtune checkpoint of a PathChat-trainer checkpoint folder ``source`` into ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from medtune.models.build import ModelSpec, build_vlm
    from medtune.models.timm_import import write_dinov2
    from medtune.models.weights import tensors_named

    source = local_folder(source)
    path, raw = checkpoint_config(source)
    language_model = _language_model(raw, path)
    _check(raw, path, source)
    mode = conv_mode or "llava_llama_2"
    if mode != "llava_llama_2":
        raise SpecError(f"conversation mode {mode!r}: PathChat's code has llava_llama_2 (and plain, for its "
                        "pretraining), which medtune renders")
    tower_weights = {key.removeprefix("vision_tower."): value
                     for key, value in tensors_named(source / TOWER_WEIGHTS, "").items()}
    projector = {key.split("mm_projector.", 1)[1]: value
                 for key, value in tensors_named(source, "mm_projector.").items()}
    settings = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in (
        "architectures", "model_type", "_name_or_path", "transformers_version", "use_mm_proj", "image_aspect_ratio",
        "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "tokenizer_padding_side", "tokenizer_model_max_length")}
    with tempfile.TemporaryDirectory() as tower_dir, quiet_transformers():
        write_dinov2(tower_weights, tower_dir, heads=TOWERS[raw["mm_vision_tower"]], where=source / TOWER_WEIGHTS)
        llm = AutoModelForCausalLM.from_pretrained(str(source), config=AutoConfig.for_model(language_model, **settings),
                                                   dtype=getattr(torch, dtype))
        tokenizer = _tokenizer_as_loaded(source, bool(raw.get("mm_use_im_patch_token", True)))
        queries = projector["attn_pool.query"]
        spec = ModelSpec(vision=tower_dir, llm=str(source), projector=PROJECTOR, projector_queries=queries.shape[0],
                         projector_heads=POOL_HEADS, projector_query_width=queries.shape[1],
                         vision_feature_layer=-1, vision_feature_select="cls_patch",
                         vision_feature_source="last_hidden_state", tokenizer=str(source), template=mode,
                         pad_mode=SQUARING[raw.get("image_aspect_ratio")], dtype=dtype)
        vlm = build_vlm(spec, llm=llm, tokenizer=tokenizer)
    pool = vlm.model.model.multi_modal_projector
    pool.load_state_dict(_projector_state(projector, pool.state_dict()), strict=True)
    vlm.save(out)
    return vlm


def _check(raw: dict, path: Path, source: Path) -> None:
    problems = []
    if raw.get("mm_projector_type") != PROJECTOR:
        problems.append(f"mm_projector_type {raw.get('mm_projector_type')!r} (medtune imports {PROJECTOR})")
    if raw.get("mm_vision_tower") not in TOWERS:
        problems.append(f"mm_vision_tower {raw.get('mm_vision_tower')!r} (PathChat's code builds {', '.join(TOWERS)})")
    if raw.get("mm_vision_select_layer", -1) != -1:
        problems.append("mm_vision_select_layer other than -1 (PathChat's tower raises)")
    if raw.get("mm_vision_select_feature", "patch") != "patch":
        problems.append(f"mm_vision_select_feature {raw['mm_vision_select_feature']!r} (PathChat's tower raises)")
    if raw.get("image_aspect_ratio") not in SQUARING:
        problems.append(f"image_aspect_ratio {raw['image_aspect_ratio']!r} (medtune imports pad and square)")
    if raw.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end: true (<im_start>/<im_end> around each image)")
    if not (source / TOWER_WEIGHTS).is_file():
        problems.append(f"no {TOWER_WEIGHTS} beside the checkpoint (PathChat's builder loads the tower from it)")
    if problems:
        raise SpecError(f"{path}: cannot import this PathChat checkpoint: " + "; ".join(problems))


def _projector_state(seed: dict, template: dict) -> dict:
    import torch

    query_width = seed["attn_pool.to_q.weight"].shape[0]
    keys, values = seed["attn_pool.to_kv.weight"].split(query_width)
    state = {"queries": seed["attn_pool.query"],
             "query_norm.weight": seed["attn_pool.ln_q.weight"], "query_norm.bias": seed["attn_pool.ln_q.bias"],
             "context_norm.weight": seed["attn_pool.ln_k.weight"], "context_norm.bias": seed["attn_pool.ln_k.bias"],
             "attention.q_proj_weight": seed["attn_pool.to_q.weight"], "attention.k_proj_weight": keys,
             "attention.v_proj_weight": values, "attention.out_proj.weight": seed["attn_pool.to_out.weight"],
             "output_norm.weight": seed["ln.weight"], "output_norm.bias": seed["ln.bias"],
             "mlp.linear_1.weight": seed["proj.0.weight"], "mlp.linear_1.bias": seed["proj.0.bias"],
             "mlp.linear_2.weight": seed["proj.2.weight"], "mlp.linear_2.bias": seed["proj.2.bias"]}
    for name in ("attention.in_proj_bias", "attention.out_proj.bias"):   # PathChat's projections have none
        state[name] = torch.zeros_like(template[name])
    missing = sorted(set(template) - set(state))
    if missing:
        raise SpecError(f"the attention pool has weights the PathChat projector does not fill: {missing}")
    return state
