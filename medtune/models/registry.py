"""medtune's own model classes, registered with transformers' Auto classes in one call.

``register_model_classes()`` imports every module that defines a medtune model type (each registers itself
on import), so ``AutoModelForImageTextToText.from_pretrained`` loads any checkpoint medtune writes. Loading
code (model kinds, merge, QLoRA reload, resume) calls it instead of naming the modules itself.
"""
from __future__ import annotations

import importlib

MODEL_MODULES = (
    "medtune.models.medtune_vlm",   # medtune_vlm: projectors transformers' Llava does not have
    "medtune.models.moe.model",     # medtune_moe_vlm: composed models with upcycled experts
)


def register_model_classes() -> None:
    for name in MODEL_MODULES:
        importlib.import_module(name)
