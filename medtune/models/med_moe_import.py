"""``medtune model import`` for Med-MoE's checkpoints: stage 2 (``llava_phi`` / ``llava_stablelm``, dense) and
stage 3 (``moe_llava_phi`` / ``moe_llava_stablelm``), the two language models Med-MoE ships (phi-2, StableLM 2).

Med-MoE (jiangsongtao/Med-MoE, a MoE-LLaVA fork; facts from 148cbd6: ``moellava/model/language_model/
llava_{phi,stablelm}[_moe].py``, ``stablelm/configuration_stablelm_epoch.py``, ``moellava/model/llava_arch.py``,
``moellava/model/builder.py``, ``moe/layer.py``, ``moe/sharded_moe.py``, ``moellava/eval/model_vqa_med.py``) saves
one causal LM whose state dict also holds
the projector (``model.mm_projector.image_spatial_proj.{0,2}.*``) and a copy of the frozen CLIP tower; its config
names the tower ``mm_image_tower`` and the projector ``image_projector_type``. In stage 3 every MoE layer's FFN
is ``model.layers.L.mlp.deepspeed_moe.experts.deepspeed_experts.E.*`` (the routed experts: Phi's ``fc1`` /
``fc2``, StableLM's ``gate_proj`` / ``up_proj`` / ``down_proj``), ``mlp.deepspeed_moe.gate.wg.{weight,bias}`` (the
router, a Linear with bias) and ``mlp.meta_moe.*`` (the always-on "meta" expert); ``config.moe`` holds the
layers, expert counts and top-k. Med-MoE vendors StableLM as the remote-code ``stablelm_epoch`` model, whose
config says ``rope_pct`` and ``norm_eps`` where transformers' ``stablelm`` says ``partial_rotary_factor`` and
``layer_norm_eps``; the modules are the same.

What the import reproduces, as Med-MoE's loader and evaluation compute it:

* the LM and projector from the checkpoint, the tower from the checkpoint ``mm_image_tower`` names (the copy in
  the state dict is dropped, as Med-MoE's loader drops it); the LM head has no bias (Med-MoE builds it without
  one; transformers' Phi has one, removed), so a stage-2 model is transformers' Llava;
* the embeddings resized to the tokenizer, as Med-MoE's builder does (phi-2's 51,200 rows shrink to its
  tokenizer's length), before medtune adds its image token;
* stage 3 as medtune's moe kind with Med-MoE's routing: top-1 with the softmax probability as weight (no
  renormalisation), the meta expert added with weight 1, no token dropped (Med-MoE hard-codes capacity 4 with
  ``drop_tokens=False``);
* images as ``model_vqa_med.py`` feeds them: the CLIP processor's resize and centre crop (``pad_mode: crop``;
  training padded to a square, the evaluation script does not), and the ``phi`` / ``stablelm`` conversation
  template (the same prompt).

Refused by name: other model types (MoE-LLaVA's Qwen, Llama, Mistral, MiniCPM: Med-MoE ships none, and no
fixture from its code), a video tower, ``mm_use_im_start_end``, top-2 routing (Med-MoE draws its second expert
with Gumbel noise, at evaluation too), ``use_residual``, ``ep_size`` > 1 and layers with different expert counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medtune.errors import InputFileError, SpecError
from medtune.models.llava_import import (checkpoint_config, local_folder, projector_and_feature_refusals,
                                         quiet_transformers)

MODEL_TYPES = {"llava_phi": "phi", "moe_llava_phi": "phi", "llava_stablelm": "stablelm",
               "moe_llava_stablelm": "stablelm"}
CONV_MODES = (None, "phi", "stablelm")   # conversation.py: the two templates are the same (system, USER/ASSISTANT)
# stablelm_epoch's config names -> transformers' stablelm
STABLELM_EPOCH_KEYS = {"rope_pct": "partial_rotary_factor", "norm_eps": "layer_norm_eps"}
# each expert's Linear layers, in the order medtune fuses them (gate rows before up rows)
EXPERT_LINEARS = {"phi": (("fc1",), "fc2"), "stablelm": (("gate_proj", "up_proj"), "down_proj")}
# Med-MoE keys that describe the multimodal wrapper or the training run, never the LM.
WRAPPER_KEYS = ("moe", "use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "image_aspect_ratio",
                "tokenizer_padding_side", "tokenizer_model_max_length", "image_projector_type",
                "video_projector_type", "video_global_proj", "video_temproal_proj", "video_spatial_proj",
                "architectures", "model_type", "_name_or_path", "transformers_version", "auto_map")
MOE_PREFIX, META_PREFIX = "mlp.deepspeed_moe.", "mlp.meta_moe."


@dataclass
class MedMoELayout:
    """What a Med-MoE checkpoint's config says, read without transformers (its model types are not registered)."""

    source: Path
    language_model: str        # phi | stablelm
    text_settings: dict        # the LM's own config keys
    vision_tower: str
    projector: str
    select_layer: int
    select_feature: str
    moe: dict | None           # config.moe of a stage-3 checkpoint

    @classmethod
    def read(cls, source: str | Path) -> "MedMoELayout":
        source = Path(source)
        path, raw = checkpoint_config(source)
        if raw.get("model_type") not in MODEL_TYPES or "mm_image_tower" not in raw:
            raise SpecError(f"{path}: model_type {raw.get('model_type')!r} is not a Med-MoE checkpoint medtune "
                            f"imports ({', '.join(MODEL_TYPES)}, with mm_image_tower)")
        moe = raw.get("moe") if raw["model_type"].startswith("moe_") else None
        problems = _refusals(raw, moe)
        if problems:
            raise SpecError(f"{path}: cannot import this Med-MoE checkpoint: " + "; ".join(problems))
        settings = {STABLELM_EPOCH_KEYS.get(k, k): v for k, v in raw.items()
                    if not k.startswith("mm_") and k not in WRAPPER_KEYS
                    and not (k == "rope_scaling" and v is None)}   # transformers 5 reads rope_parameters
        return cls(source=source, language_model=MODEL_TYPES[raw["model_type"]], text_settings=settings,
                   vision_tower=raw["mm_image_tower"], projector=raw.get("image_projector_type", "linear"),
                   select_layer=int(raw.get("mm_vision_select_layer", -1)),
                   select_feature=raw.get("mm_vision_select_feature", "patch"), moe=moe)

    def moe_settings(self):
        """medtune's MoESettings for config.moe: Med-MoE's routing (see the module docstring)."""
        from medtune.models.moe.settings import MoESettings

        return MoESettings.preset("med-moe", layers=list(self.moe["moe_layers_idx"]),
                                  num_experts=int(self.moe["num_experts"][0]), top_k=1,
                                  aux_loss_coef=float(self.moe.get("router_aux_loss_coef") or 0.0))


def _refusals(raw: dict, moe: dict | None) -> list[str]:
    """Each setting that would change the computation in a way medtune does not reproduce, by name."""
    problems = projector_and_feature_refusals(raw, "image_projector_type", "Med-MoE")
    if raw.get("mm_video_tower"):
        problems.append(f"mm_video_tower {raw['mm_video_tower']!r} (medtune imports the image path only)")
    if raw.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end: true (<im_start>/<im_end> around each image)")
    if raw.get("model_type", "").startswith("moe_"):
        problems += _moe_refusals(moe)
    return problems


def _moe_refusals(moe: dict | None) -> list[str]:
    if not isinstance(moe, dict) or not moe.get("moe_layers_idx") or not moe.get("num_experts"):
        return ["config.moe lacks moe_layers_idx or num_experts (a stage-3 config written by "
                "initialize_moe_modules has both)"]
    problems = []
    counts = moe["num_experts"] if isinstance(moe["num_experts"], list) else [moe["num_experts"]]
    if len(set(counts)) != 1:
        problems.append(f"moe.num_experts {counts} (medtune gives every MoE layer the same number of experts)")
    if moe.get("top_k_experts", 1) != 1:
        problems.append(f"moe.top_k_experts {moe['top_k_experts']} (Med-MoE's top-2 draws the second expert with "
                        "Gumbel noise, at evaluation too, so its answers are not reproducible; medtune imports top-1)")
    if moe.get("use_residual"):
        problems.append("moe.use_residual: true (the residual MoE's coefficient layer)")
    if moe.get("ep_size", 1) != 1:
        problems.append(f"moe.ep_size {moe['ep_size']} (each rank's checkpoint holds only its own experts)")
    return problems


def is_moe_llava(source: str | Path) -> bool:
    """Whether ``source`` (a folder, or a hub name fetched) was saved by MoE-LLaVA's / Med-MoE's code: its config
    names the tower ``mm_image_tower`` (LLaVA's says ``mm_vision_tower``)."""
    try:
        return "mm_image_tower" in checkpoint_config(local_folder(source))[1]
    except InputFileError:
        return False   # LLaVA's importer names what is wrong with the folder


def import_med_moe(source: str | Path, out: str | Path, *, vision_tower: str | None = None,
                   conv_mode: str | None = None, dtype: str = "float32"):
    """Write the medtune checkpoint of a Med-MoE stage-2 or stage-3 checkpoint folder ``source`` into ``out``;
    returns the loaded VLM (composed, or the moe kind for stage 3)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from medtune.models.build import ModelSpec, build_vlm
    from medtune.models.llava_import import tower_source

    if conv_mode not in CONV_MODES:
        raise SpecError(f"conversation mode {conv_mode!r}: Med-MoE's checkpoints are evaluated with 'phi' (its "
                        "model_vqa_med.py default) or 'stablelm', which write the same prompt")
    layout = MedMoELayout.read(local_folder(source))
    tensors = _checkpoint_tensors(layout.source)
    text_config = AutoConfig.for_model(layout.language_model, **layout.text_settings)
    with quiet_transformers():
        llm = AutoModelForCausalLM.from_config(text_config, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(str(layout.source))
    _load_language_model(llm, tensors, layout)
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)   # Med-MoE's builder: to the tokenizer
    llm.lm_head.register_parameter("bias", None)   # Med-MoE's Phi head has none (transformers' has one)
    spec = ModelSpec(vision=vision_tower or tower_source(layout.source, layout.vision_tower), llm=str(layout.source),
                     projector=layout.projector, vision_feature_layer=layout.select_layer,
                     vision_feature_select=layout.select_feature, tokenizer=str(layout.source),
                     template=conv_mode or layout.language_model,
                     pad_mode="crop", dtype=dtype, projector_weights=str(layout.source))
    vlm = build_vlm(spec, llm=llm, tokenizer=tokenizer)
    if layout.moe is not None:
        vlm = vlm.with_experts(layout.moe_settings())
        _load_experts(vlm, tensors, layout)
    vlm.save(out)
    return vlm


def _checkpoint_tensors(source: Path) -> dict:
    """Every tensor of the checkpoint but the tower's copy (safetensors, else pickles read as tensors only)."""
    from medtune.models.weights import tensors_named

    return {key: tensor for key, tensor in tensors_named(source, "").items() if ".image_tower." not in key}


def _load_language_model(llm, tensors: dict, layout: MedMoELayout) -> None:
    """The LM's tensors into ``llm``: a stage-3 MoE layer's meta expert stands where the dense FFN was (it becomes
    the shared expert when the experts are added); the experts and router are read later. The LM head's bias
    is not in the checkpoint: Med-MoE's Phi has none."""
    state = {}
    for key, tensor in tensors.items():
        if "mm_projector." in key or MOE_PREFIX in key:
            continue
        state[key.replace(META_PREFIX, "mlp.")] = tensor
    missing, unexpected = llm.load_state_dict(state, strict=False)
    missing = [key for key in missing if key != "lm_head.bias"]
    if missing or unexpected:
        raise InputFileError(f"{layout.source}: the weights do not fit a {layout.language_model} LM of this config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def _load_experts(vlm, tensors: dict, layout: MedMoELayout) -> None:
    """Each MoE layer's routed experts and router from Med-MoE's DeepSpeed keys into medtune's fused tensors
    (Phi: fc1 -> up_proj, fc2 -> down_proj, with biases; StableLM: gate_proj and up_proj rows -> gate_up_proj,
    down_proj -> down_proj)."""
    import torch

    from medtune.models.moe.layers import moe_blocks

    blocks = dict(moe_blocks(vlm.model))
    for layer in layout.moe["moe_layers_idx"]:
        block = next((b for name, b in blocks.items() if name.endswith(f"layers.{layer}.mlp")), None)
        prefix = f"model.layers.{layer}.{MOE_PREFIX}"
        experts = [f"{prefix}experts.deepspeed_experts.{e}." for e in range(block.experts.num_experts)]
        ups, down = EXPERT_LINEARS[layout.language_model]
        kinds = ("weight", "bias") if block.experts.has_bias else ("weight",)
        needed = [f"{p}{linear}.{kind}" for p in experts for linear in (*ups, down) for kind in kinds]
        needed += [f"{prefix}gate.wg.weight", f"{prefix}gate.wg.bias"]
        absent = [key for key in needed if key not in tensors]
        if absent:
            raise InputFileError(f"{layout.source}: MoE layer {layer} lacks {absent[:3]} (a stage-3 checkpoint "
                                 "holds every expert's FFN and the router's weight and bias)")
        with torch.no_grad():
            for kind in kinds:
                suffix = "_bias" if kind == "bias" else ""
                getattr(block.experts, block.experts.up_name + suffix).copy_(torch.stack(
                    [torch.cat([tensors[f"{p}{linear}.{kind}"] for linear in ups]) for p in experts]))
                getattr(block.experts, "down_proj" + suffix).copy_(
                    torch.stack([tensors[f"{p}{down}.{kind}"] for p in experts]))
            block.gate.weight.copy_(tensors[f"{prefix}gate.wg.weight"])
            block.gate.bias.copy_(tensors[f"{prefix}gate.wg.bias"])
