"""An upcycled Qwen2 model in transformers' native MoE architecture: Llava + Qwen2-MoE, loadable without medtune.

medtune's MoE kind (:mod:`medtune.models.moe.model`) is a medtune class; where the LLM is Qwen2, transformers
(and vLLM) have a native sibling, Qwen2-MoE, that holds almost everything Med-MoE's stage 3 makes. This module
rewrites a medtune MoE model as a stock ``LlavaForConditionalGeneration`` whose ``text_config`` is a
``qwen2_moe`` config, and saves it so that ``AutoModelForImageTextToText.from_pretrained`` loads it with medtune
not installed.

The mapping, per MoE layer (all exact unless said):

- experts: medtune's fused ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]`` are
  Qwen2-MoE's layout as they are;
- which layers: ``decoder_sparse_step=1`` with ``mlp_only_layers`` = every other layer. Qwen2-MoE's own step
  makes layers with ``(i + 1) % step == 0`` sparse, so step 2 would give the odd layers 1, 3, 5 ..., not
  Med-MoE's 0, 2, 4 ...;
- routing: ``num_experts_per_tok`` = top-k, ``norm_topk_prob`` = ``renormalize``; dropless only
  (Qwen2-MoE has no capacity);
- shared expert at weight 1 (Med-MoE's ungated meta expert): Qwen2-MoE always gates it by
  ``sigmoid(Linear(H, 1))``, so the gate is written as zeros and the shared ``down_proj`` doubled:
  ``sigmoid(0) * 2 = 1`` exactly (both factors are powers of two). The gate is frozen in meaning: training it
  turns the meta expert into a gated one, so it is returned with ``requires_grad=False``;
  a gated shared expert (``shared_expert_gate: true``) is copied as it is; no shared expert becomes an
  all-zero shared expert (exact: its output and its gradients are 0, so it stays off when trained, at the
  cost of one FFN of compute per MoE layer) rather than a refusal;
- the router: ``mlp.gate.weight`` is copied. **Its bias is dropped**: Qwen2-MoE's router has none and its input
  (an RMSNorm output) has no constant component to fold it into. Only the bias's spread across experts
  matters (softmax ignores a constant shift), so a bias equal on all experts is dropped exactly; otherwise
  routing can change, and the report says by how much on a probe batch;
- the router's dtype: medtune computes the router in float32 whatever the model dtype (as Med-MoE); Qwen2-MoE
  (and vLLM) compute ``F.linear`` in the model dtype and only the softmax in float32. Identical in a float32
  model; in bfloat16 the logits are rounded before the softmax, which can flip near-ties.

Choices:

- The native model *shares* the unchanged tensors with the medtune model (no copy of a 7B model); the
  converted ones (doubled shared ``down_proj``, zero gates) are new.
- The saved folder's ``medtune.json`` says ``kind: composed``: medtune loads it as what it is, a Llava with a
  transformers LLM, never as its own MoE class (whose state-dict names and router differ). Its ``spec`` is
  null (the dense spec would rebuild a dense Qwen2); ``native_export`` records where it came from (the MoE
  settings, the dense spec) and the report.
- ``text_config.architectures`` is set to ``Qwen2MoeForCausalLM``: vLLM's Llava picks its LLM class from it.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from medtune.errors import SpecError

log = logging.getLogger(__name__)

NATIVE_TEXT_MODEL_TYPE = "qwen2_moe"
NATIVE_EXPORT_KEY = "native_export"   # the medtune.json entry that records the export
# Questions for the default probe: short, medical, about an image, as the routing will see them.
PROBE_QUESTIONS = ("What imaging modality is this?", "Is there an abnormality in the left lung?",
                   "Describe the findings in this image.")

__all__ = ["default_probe", "native_config", "routing_agreement", "save_native_qwen2_moe", "to_native_qwen2_moe"]


# ------------------------------------------------------------------------------------------------- checks


def _check_exportable(vlm) -> tuple[Any, list[int], dict[int, Any]]:
    """(settings, MoE layer indices, {layer: MoEBlock}) of a medtune MoE model that Qwen2-MoE can hold, or a
    SpecError naming the setting that it cannot."""
    from medtune.models.moe import layers as moe
    from medtune.models.kinds.base import LORA_COMPONENTS

    config = vlm.model.config
    if getattr(vlm, "experts", None) is None:
        raise SpecError(f"native export: needs a medtune MoE model (kind moe), got a {getattr(vlm, 'kind', '?')} "
                        "model without experts; upcycle it first (a recipe stage's moe section, or "
                        "vlm.with_experts(settings))")
    if getattr(config, "moe", None) is None:   # experts held by a family's own class (the native kind)
        raise SpecError(f"native export: converts a composed model with experts (kind moe); this {vlm.kind} "
                        f"{type(vlm.model).__name__} with experts has no Qwen2-MoE form medtune writes")
    llm_type = config.text_config.model_type
    if llm_type != "qwen2":
        raise SpecError(f"llm: the native MoE export needs a qwen2 LLM (Qwen2 -> Qwen2-MoE); this model's LLM is "
                        f"{llm_type!r}, which has no native MoE sibling in transformers (keep the moe kind)")
    projector = getattr(config, "projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise SpecError(f"projector: {projector!r} has no native transformers class; only mlp2x_gelu is "
                        "transformers' Llava projector (keep the moe kind)")
    if getattr(config, "lm_head_bias", False):
        raise SpecError("lm_head_bias: transformers' Llava has no LM-head bias (keep the moe kind)")
    lora = [name for name, _ in vlm.model.named_parameters() if set(name.split(".")) & set(LORA_COMPONENTS)]
    if lora:
        raise SpecError(f"lora: the model carries LoRA adapters ({lora[0]} ...); merge them first (medtune merge)")

    settings = vlm.settings
    if settings.capacity_factor is not None:
        raise SpecError(f"moe.capacity_factor: {settings.capacity_factor} drops tokens over capacity; Qwen2-MoE is "
                        "dropless only (set moe.capacity_factor: null)")
    layers = list(config.moe_layers)
    blocks = {}
    for name, block in moe.moe_blocks(vlm.model):
        experts = block.experts
        if not isinstance(experts, moe.MoEExperts):
            raise SpecError(f"lora: {name}.experts is wrapped by an adapter; merge it first (medtune merge)")
        if not experts.has_gate or experts.has_bias:
            raise SpecError(f"ffn: {name} has {'ungated' if not experts.has_gate else 'biased'} experts; Qwen2-MoE's "
                            "experts are gated SwiGLU FFNs without bias")
        blocks[int(name.split("layers.")[-1].split(".")[0])] = block
    if sorted(blocks) != sorted(layers):
        raise SpecError(f"moe_layers: the config names layers {layers} but the model has MoE blocks in "
                        f"{sorted(blocks)}")
    intermediate = config.text_config.intermediate_size
    sizes = {block.experts.intermediate_dim for block in blocks.values()}
    if sizes != {intermediate}:
        raise SpecError(f"intermediate_size: experts of width {sorted(sizes)} differ from the dense FFN width "
                        f"{intermediate}; Qwen2-MoE's dense layers and shared expert would not fit")
    return settings, layers, blocks


# ------------------------------------------------------------------------------------------------- config


def native_config(config, settings, moe_layers: list[int]):
    """The LlavaConfig (with a Qwen2MoeConfig text config) of a medtune MoE model's ``config``."""
    from transformers import LlavaConfig, Qwen2MoeConfig

    text = config.text_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        text.pop(key, None)
    num_layers = config.text_config.num_hidden_layers
    intermediate = config.text_config.intermediate_size
    text.update(
        num_experts=settings.num_experts, num_experts_per_tok=settings.top_k,
        norm_topk_prob=settings.renormalize,
        moe_intermediate_size=intermediate, shared_expert_intermediate_size=intermediate,
        # (i + 1) % 1 == 0 for every layer: the sparse layers are exactly those not listed as MLP-only.
        decoder_sparse_step=1, mlp_only_layers=[i for i in range(num_layers) if i not in moe_layers],
        qkv_bias=True,   # Qwen2's attention always has q/k/v biases
        router_aux_loss_coef=float(settings.aux_loss_coef), output_router_logits=False,
        architectures=["Qwen2MoeForCausalLM"])
    text_config = Qwen2MoeConfig(**text)
    return LlavaConfig(
        vision_config=copy.deepcopy(config.vision_config), text_config=text_config,
        image_token_index=config.image_token_index, image_seq_length=config.image_seq_length,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_feature_layer=config.vision_feature_layer, multimodal_projector_bias=config.multimodal_projector_bias,
        tie_word_embeddings=bool(config.tie_word_embeddings))


# -------------------------------------------------------------------------------------------------- model


def to_native_qwen2_moe(vlm, *, probe: list[dict] | dict | None = None):
    """(``LlavaForConditionalGeneration`` with a Qwen2-MoE LLM, report) for the medtune MoE model ``vlm``.

    ``probe``: model inputs (a dict of tensors, or a list of them) on which the report compares routing and
    logits of the two models; None uses :func:`default_probe`. The report (JSON-serialisable) has the mapping
    (layers, shared expert, routing), the dropped router bias (largest magnitude, largest spread across experts),
    the routers' dtypes, and on the probe: top-k routing agreement per MoE layer and the largest logit
    difference. A bias whose spread is not 0 is also logged as a warning.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    settings, layers, blocks = _check_exportable(vlm)
    source = vlm.model
    config = native_config(source.config, settings, layers)
    state = source.state_dict()
    config.multimodal_projector_bias = "model.multi_modal_projector.linear_1.bias" in state
    shared = _map_moe_layers(state, settings, layers, source.config.text_config.hidden_size)
    with torch.device("meta"):
        native = LlavaForConditionalGeneration(config)
    native.load_state_dict(state, strict=True, assign=True)
    _copy_meta_buffers(native, source)
    if config.tie_word_embeddings:
        native.tie_weights()
    for name, tensor in [*native.named_parameters(), *native.named_buffers()]:
        if tensor.is_meta:
            raise RuntimeError(f"native export left {name} uninitialised (meta tensor)")
    for layer in layers:
        # weight 0 is the ungated meta expert (or the off zero expert) only while it stays 0
        native.model.language_model.layers[layer].mlp.shared_expert_gate.weight.requires_grad_(
            settings.shared_expert_gate)
    native.generation_config = copy.deepcopy(source.generation_config)
    native.train(source.training)

    report = _mapping_report(settings, layers, config, shared, blocks, source.dtype)
    probe = default_probe(vlm) if probe is None else probe
    report["probe"] = routing_agreement(source, native, [probe] if isinstance(probe, dict) else list(probe))
    _warn_about_bias(report)
    return native, report


def _map_moe_layers(state: dict, settings, layers: list[int], hidden_size: int) -> str:
    """In place: medtune's MoE-layer keys -> Qwen2-MoE's (same names but for the router bias and the shared
    expert's gate). Returns how the shared expert was written."""
    import torch

    for layer in layers:
        prefix = f"model.language_model.layers.{layer}.mlp."
        state.pop(prefix + "gate.bias", None)
        like = state[prefix + "gate.weight"]
        zero_gate = torch.zeros(1, hidden_size, dtype=like.dtype, device=like.device)
        if not settings.shared_expert:
            experts = state[prefix + "experts.down_proj"]
            hidden, intermediate = experts.shape[1], experts.shape[2]
            for name, shape in (("gate_proj", (intermediate, hidden)), ("up_proj", (intermediate, hidden)),
                                ("down_proj", (hidden, intermediate))):
                state[prefix + f"shared_expert.{name}.weight"] = torch.zeros(shape, dtype=like.dtype,
                                                                              device=like.device)
            state[prefix + "shared_expert_gate.weight"] = zero_gate
        elif not settings.shared_expert_gate:
            down = prefix + "shared_expert.down_proj.weight"
            state[down] = state[down] * 2   # sigmoid(0) * 2 = 1, exactly
            state[prefix + "shared_expert_gate.weight"] = zero_gate
    if not settings.shared_expert:
        return "none in medtune: an all-zero shared expert (output and gradients 0)"
    if settings.shared_expert_gate:
        return "gated: sigmoid(shared_expert_gate) copied as it is"
    return "ungated, weight 1: shared_expert_gate = 0 and shared down_proj x 2 (sigmoid(0) * 2 = 1 exactly)"


def _copy_meta_buffers(native, source) -> None:
    """Non-persistent buffers (rotary inv_freq, position ids) are not in a state dict: take the source's."""
    source_buffers = dict(source.named_buffers())
    for name, buffer in list(native.named_buffers()):
        if buffer.is_meta:
            if name not in source_buffers:
                raise RuntimeError(f"native export: no buffer {name} in the medtune model to take")
            module_name, _, attribute = name.rpartition(".")
            native.get_submodule(module_name)._buffers[attribute] = source_buffers[name]


def _mapping_report(settings, layers, config, shared: str, blocks: dict, dtype) -> dict[str, Any]:
    text = config.text_config
    biases = {layer: block.gate.bias.detach().float() for layer, block in blocks.items()
              if block.gate.bias is not None}
    per_layer = {str(layer): {"max_abs": float(bias.abs().max()), "spread": float(bias.max() - bias.min())}
                 for layer, bias in biases.items()}
    notes = []
    if "sliding_attention" in (text.layer_types or []):
        notes.append("sliding-window layers: transformers honours layer_types; vLLM's Qwen2-MoE has no sliding "
                     "window")
    if text.hidden_act != "silu":
        notes.append(f"hidden_act {text.hidden_act!r}: transformers runs it; vLLM's Qwen2-MoE supports silu only")
    if settings.z_loss_coef:
        notes.append(f"moe.z_loss_coef {settings.z_loss_coef}: Qwen2-MoE has no router z-loss (training only)")
    return {
        "architecture": "LlavaForConditionalGeneration + Qwen2MoeForCausalLM",
        "moe_layers": list(layers), "mlp_only_layers": list(text.mlp_only_layers), "decoder_sparse_step": 1,
        "num_experts": text.num_experts, "num_experts_per_tok": text.num_experts_per_tok,
        "norm_topk_prob": text.norm_topk_prob, "router_aux_loss_coef": text.router_aux_loss_coef,
        "shared_expert": shared,
        "router_bias": {
            "dropped": bool(biases),
            "max_abs": max((v["max_abs"] for v in per_layer.values()), default=0.0),
            "max_spread": max((v["spread"] for v in per_layer.values()), default=0.0),
            "per_layer": per_layer,
            "note": "Qwen2-MoE's router has no bias; only its spread across experts changes routing"},
        "router_dtype": {
            "medtune": "float32", "native": str(dtype).removeprefix("torch."),
            "note": "medtune computes router logits in float32; Qwen2-MoE and vLLM in the model dtype "
                    "(softmax in float32): identical in a float32 model"},
        "notes": notes,
    }


def _warn_about_bias(report: dict) -> None:
    bias, probe = report["router_bias"], report["probe"]
    if bias["max_spread"] > 0:
        log.warning("native export: the router bias (largest |b| %.4g, largest spread across experts %.4g) cannot be "
                    "written in Qwen2-MoE and was dropped; top-k routing agreement with the medtune model on the "
                    "probe (%d tokens): %.4f (per MoE layer: %s)", bias["max_abs"], bias["max_spread"],
                    probe["tokens"], probe["routing_agreement"],
                    ", ".join(f"{layer}: {share:.4f}" for layer, share in probe["per_layer"].items()))


# ------------------------------------------------------------------------------------------------- probing


def default_probe(vlm) -> list[dict]:
    """Prompts (model inputs, one per question) for comparing routing: medical questions about a synthetic
    image (a fixed-seed noise picture), encoded as the model's chat template makes them, plus one without an
    image."""
    import numpy as np
    from PIL import Image

    size = vlm.image_size or 32
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    prompts = [vlm.encode_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                 [image]) for q in PROBE_QUESTIONS]
    prompts.append(vlm.encode_prompt([{"role": "user", "content": PROBE_QUESTIONS[-1]}], []))
    return [{key: value for key, value in prompt.items() if value is not None} for prompt in prompts]


def routing_agreement(medtune_model, native_model, probe: list[dict]) -> dict[str, Any]:
    """Run both models on each probe input and compare, per MoE layer, the set of top-k experts each token
    goes to (each model on its own hidden states, so a change in one layer shows in the later ones too).

    Returns {"tokens", "routing_agreement" (share of (token, layer) pairs with the same experts),
    "per_layer" {layer: share}, "max_abs_logit_diff"}.
    """
    import torch

    from medtune.models.moe.layers import MoERouter

    def choices(model, router_class):
        chosen: dict[int, list] = {}
        handles = []
        for name, module in model.named_modules():
            if isinstance(module, router_class):
                layer = int(name.split("layers.")[-1].split(".")[0])
                handles.append(module.register_forward_hook(
                    lambda _m, _i, output, layer=layer: chosen.setdefault(layer, []).append(
                        output[2].sort(dim=-1).values.cpu())))
        return chosen, handles

    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    medtune_chosen, medtune_hooks = choices(medtune_model, MoERouter)
    native_chosen, native_hooks = choices(native_model, Qwen2MoeTopKRouter)
    modes = medtune_model.training, native_model.training
    medtune_model.eval(), native_model.eval()
    largest, tokens = 0.0, 0
    device = next(medtune_model.parameters()).device
    try:
        with torch.no_grad():
            for inputs in probe:
                inputs = {key: value.to(device) if hasattr(value, "to") else value for key, value in inputs.items()}
                ours = medtune_model(**inputs, use_cache=False).logits
                theirs = native_model(**inputs, use_cache=False).logits
                largest = max(largest, float((ours.float() - theirs.float()).abs().max()))
                tokens += inputs["input_ids"].numel()
    finally:
        for handle in (*medtune_hooks, *native_hooks):
            handle.remove()
        medtune_model.train(modes[0]), native_model.train(modes[1])
    per_layer, same, total = {}, 0, 0
    for layer in sorted(medtune_chosen):
        ours, theirs = torch.cat(medtune_chosen[layer]), torch.cat(native_chosen[layer])
        agree = (ours == theirs).all(dim=-1)
        per_layer[str(layer)] = float(agree.float().mean())
        same, total = same + int(agree.sum()), total + agree.numel()
    return {"tokens": tokens, "routing_agreement": same / total if total else 1.0, "per_layer": per_layer,
            "max_abs_logit_diff": largest}


# -------------------------------------------------------------------------------------------------- saving


def save_native_qwen2_moe(vlm, out_dir: str | Path, *, probe: list[dict] | dict | None = None) -> dict[str, Any]:
    """Write ``vlm`` (a medtune MoE model with a Qwen2 LLM) as a complete native checkpoint folder and return the
    export report: safetensors with one key per expert (``...mlp.experts.{e}.gate_proj.weight``, checked on
    disk), config.json (llava + qwen2_moe), tokenizer with its chat template, a LlavaProcessor, the image
    processor, and a medtune.json of kind ``composed`` that records the export."""
    import json

    from medtune.data.jsonl import write_json
    from medtune.models.kinds.base import MEDTUNE_FILE
    from medtune.models.kinds.composed import ComposedVLM, llava_processor

    native, report = to_native_qwen2_moe(vlm, probe=probe)
    exported = ComposedVLM(
        model=native, tokenizer=vlm.tokenizer, image_processor=vlm.image_processor,
        processor=llava_processor(native.config, vlm.tokenizer, vlm.image_processor, vlm.image_token,
                                  vlm.image_tokens_per_image),
        template=vlm.template, image_token=vlm.image_token, image_token_id=vlm.image_token_id,
        image_tokens_per_image=vlm.image_tokens_per_image, image_size=vlm.image_size, pad_mode=vlm.pad_mode,
        spec=None, sample_metadata=tuple(vlm.sample_metadata))
    out = Path(out_dir)
    exported.save(out)
    _check_per_expert_keys(out, report["moe_layers"], report["num_experts"])
    metadata = json.loads((out / MEDTUNE_FILE).read_text(encoding="utf-8"))
    metadata[NATIVE_EXPORT_KEY] = {"from_kind": vlm.kind, "moe": vlm.model.config.moe,
                                   "dense_spec": vlm.spec, "report": report}
    write_json(out / MEDTUNE_FILE, metadata)
    return report


def _check_per_expert_keys(out: Path, layers: list[int], num_experts: int) -> None:
    """The saved weights hold every expert under its own keys (the layout of transformers 4.x and vLLM)."""
    from safetensors import safe_open

    keys = set()
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            keys.update(handle.keys())
    fused = sorted(key for key in keys if key.endswith(("experts.gate_up_proj", "experts.down_proj")))
    missing = [f"layers.{layer}.mlp.experts.{expert}.{name}.weight" for layer in layers
               for expert in range(num_experts) for name in ("gate_proj", "up_proj", "down_proj")
               if not any(key.endswith(f"layers.{layer}.mlp.experts.{expert}.{name}.weight") for key in keys)]
    if fused or missing:
        raise RuntimeError(f"{out}: expected per-expert keys on disk; fused: {fused[:2]}, missing: {missing[:2]}")
