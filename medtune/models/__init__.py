"""Models: composed vision-language models (vision tower + projector + LLM), native HF VLMs, presets.

Public entry points (imported lazily, so ``import medtune.models`` and the CLI stay free of torch):
``ModelSpec``, ``VLM``, ``build_vlm``, ``load_vlm`` (build.py) and ``tiny_spec``, ``small_spec``,
``preset_spec`` (presets.py). Importing ``medtune.models.medtune_vlm`` registers the ``medtune_vlm`` model
type with transformers' Auto classes (``load_vlm`` does it for you).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelSpec": "medtune.models.build",
    "VLM": "medtune.models.kinds",
    "build_vlm": "medtune.models.build",
    "load_vlm": "medtune.models.build",
    "tiny_spec": "medtune.models.presets",
    "small_spec": "medtune.models.presets",
    "preset_spec": "medtune.models.presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medtune.models' has no attribute {name!r}")
