"""What trains: the one place that freezes parts, adds LoRA and builds per-part learning-rate groups.

Which parts a model has, and which parameter belongs to which, is its kind's answer (``vlm.parts``,
``vlm.part_of``: :mod:`medtune.models.kinds`); a composed VLM has a vision encoder, a projector and a language
model, plus LoRA adapters when a stage asks for them. A parameter that matches no part is an error, so a new
architecture cannot silently train the wrong thing.

Design choices:

* A learning rate of 0 freezes the part (``requires_grad=False``): frozen weights get no gradient, no optimizer
  state and no all-reduce.
* LoRA goes through PEFT on the LLM (optionally the vision tower); a trained projector is saved whole next to the
  adapters (``modules_to_save``), the way LLaVA-Med and PathChat train the projector with LoRA.
* QLoRA reloads the base with bitsandbytes 4/8-bit weights for the LLM only (vision tower, projector and head
  stay in full precision, as they train or are small); :func:`medtune.train.recipe.check_environment` has
  already refused it without CUDA and bitsandbytes.
* Each part becomes its own optimizer parameter group (split again into decay / no-decay), so the Trainer's
  scheduler scales every group from its own peak learning rate.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from medtune.train.recipe import LearningRates, LoraSpec, RecipeError

log = logging.getLogger(__name__)

@dataclass
class TrainableSummary:
    """Parameter counts per part, trainable and total, for the log and the run summary."""

    trainable: Counter
    total: Counter

    def line(self) -> str:
        parts = [f"{p} {self.trainable[p]:,}/{self.total[p]:,}" for p in self.total if self.total[p]]
        return "trainable parameters: " + ", ".join(parts)

    def to_dict(self) -> dict:
        return {"trainable": dict(self.trainable), "total": dict(self.total)}


def apply_trainable_parts(vlm, model, lr: LearningRates, lora: LoraSpec | None = None):
    """Freeze what has lr 0, unfreeze the rest, add LoRA if asked; returns the (possibly PEFT-wrapped) model.

    ``vlm`` is the model's kind object (it knows the parts); ``model`` the module to train, usually ``vlm.model``.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if lora is not None:
        whole = [part for part in ("projector", "vision") if getattr(lr, part) > 0]
        model = add_lora(vlm, model, lora, train_whole=whole)
    for name, parameter in model.named_parameters():
        part = vlm.part_of(name)
        if part == "lora":
            parameter.requires_grad_(True)
        elif "original_module" in name.split("."):
            continue  # PEFT's frozen original of a module it saves whole
        elif getattr(lr, part) > 0:
            parameter.requires_grad_(True)
    if lora is not None:
        _check_saved_with_adapters(model, vlm.part_of)
    summary = summarise(model, vlm.part_of)
    if not any(summary.trainable.values()):
        raise RecipeError("lr: no parameter trains with these learning rates (every part is frozen)")
    log.info(summary.line())
    return model


def _check_saved_with_adapters(model, part_of: Callable[[str], str]) -> None:
    """Under LoRA only adapters and PEFT's whole copies (``modules_to_save``) are saved: a parameter that trains
    outside both (a part spread over several modules, of which LoRA saves the first) would be lost on save."""
    lost = [name for name, parameter in model.named_parameters() if parameter.requires_grad
            and part_of(name) != "lora" and "modules_to_save" not in name.split(".")]
    if lost:
        raise RecipeError(f"lr.{part_of(lost[0])}: {lost[0]} would train beside the LoRA adapters but is not saved "
                          "with them; train this part in a stage without lora")


def summarise(model, part_of: Callable[[str], str]) -> TrainableSummary:
    trainable, total = Counter(), Counter()
    for name, parameter in model.named_parameters():
        part = part_of(name)
        total[part] += parameter.numel()
        if parameter.requires_grad:
            trainable[part] += parameter.numel()
    return TrainableSummary(trainable, total)


def add_lora(vlm, model, lora: LoraSpec, *, train_whole: list[str] = ()):
    """Wrap ``model`` with PEFT LoRA on the LLM's (and optionally the vision tower's) named linear layers.

    ``train_whole`` names parts trained in full beside the adapters (projector, vision): PEFT keeps a trainable
    copy of each and saves it with the adapters, so a checkpoint holds everything that changed.
    """
    from peft import LoraConfig, get_peft_model

    scopes = [re.escape(scope) for scope in vlm.lora_scopes(lora.on_vision, model)]
    parameters = vlm.lora_parameter_targets() if lora.on_experts else []
    layers = "|".join(re.escape(name) for name in lora.target_modules)
    # A regex target confines adapters to the chosen parts: the projector's and vision tower's linear layers
    # often share names (fc1, linear_1, q_proj) with the LLM's.
    target = rf"^({'|'.join(scopes)})\..*\.({layers})$"
    if not any(re.match(target, name) for name, _ in model.named_modules()):
        raise RecipeError(f"lora.target_modules: none of {lora.target_modules} is a layer of the model's "
                          "language model")
    # Expert weights are fused 3-D parameters, not layers: PEFT adapts them through target_parameters (rank r
    # per expert), which it supports without dropout only.
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target, bias="none",
        target_parameters=parameters or None,
        modules_to_save=[vlm.module_of(part, model).split(".")[-1] for part in train_whole] or None,
    )
    return get_peft_model(model, config)


def load_quantized(base: str, bits: str, *, gradient_checkpointing: bool = False):
    """The base model reloaded with its LLM quantized for QLoRA (``bits``: "4bit" or "8bit"), on this GPU."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from medtune.models.kinds.base import checkpoint_model_class
    from medtune.models.registry import register_model_classes

    register_model_classes()
    config = BitsAndBytesConfig(
        load_in_4bit=bits == "4bit", load_in_8bit=bits == "8bit", bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
    model = checkpoint_model_class(base).from_pretrained(
        str(base), quantization_config=config, device_map={"": torch.cuda.current_device()})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def parameter_groups(model, part_of: Callable[[str], str], lr: LearningRates, weight_decay: float,
                     decay_names: set[str]) -> list[dict]:
    """Optimizer groups: one per (part, decay or not), each with its part's learning rate."""
    groups: dict[tuple[str, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        key = (part_of(name), name in decay_names)
        groups.setdefault(key, []).append(parameter)
    return [
        {"params": params, "lr": getattr(lr, part), "weight_decay": weight_decay if decays else 0.0,
         "part": part}
        for (part, decays), params in sorted(groups.items())
    ]
