"""Model kinds: one class per way a family of models turns canonical samples into tensors and back.

==========  ================================================  =================================  ==========
kind        model                                             inputs                             parts
==========  ================================================  =================================  ==========
composed    vision tower + projector + LLM built by medtune   ids with N image-token copies,     vision,
            (transformers Llava, or medtune_vlm)              pixels (token cache)               projector,
                                                                                                 llm (+lora)
native      a transformers VLM medtune did not compose        its own processor's outputs        the same,
            (Idefics3 / SmolVLM, llava-hf, Qwen2-VL ...)      (in memory)                        by module
moe         composed, with every k-th FFN upcycled to         as composed, + the domain field    + experts,
            experts + shared expert + router, saved as        (routing statistics)               router, ffn
            medtune_moe_vlm
discrete    a mixed-modal LM reading VQ image codes           ids with [boi] codes [eoi] blocks  vision (the
            (Chameleon / Anole, as MedMax trains them)        (token cache; no pixels)           VQ), llm
==========  ================================================  =================================  ==========

Experts are a component any kind can hold (``vlm.experts``, :mod:`medtune.models.moe.experts`); ``moe`` is the
composed kind with them in medtune's own class, the other kinds keep their class and record them in medtune.json.

The interface every kind implements is :class:`medtune.models.kinds.base.VLM` (its docstring lists the
questions a caller may ask). Adding a kind means one module here with one ``VLM`` subclass, and one line in
:data:`KINDS`; nothing outside this package tests which kind a model is. docs/training.md walks through it.
"""
from __future__ import annotations

import importlib

from medtune.models.kinds.base import MEDTUNE_FILE, NATIVE_TEMPLATE, VLM

# kind name (as recorded in medtune.json) -> "module:class"; imported when a checkpoint of that kind is loaded
KINDS = {
    "composed": "medtune.models.kinds.composed:ComposedVLM",
    "native": "medtune.models.kinds.native:NativeVLM",
    "moe": "medtune.models.kinds.moe:MoEVLM",
    "discrete": "medtune.models.kinds.discrete:DiscreteVLM",
}
DEFAULT_KIND = "composed"   # medtune.json files written before kinds were recorded are composed models


def kind_of_foreign_checkpoint(config) -> str:
    """The kind of a checkpoint medtune did not write (no medtune.json), from its config's structure: a model
    with a VQ image tokenizer reads discrete image codes; any other VLM is native."""
    return "discrete" if getattr(config, "vq_config", None) is not None else "native"


def kind_class(name: str) -> type[VLM]:
    """The VLM subclass of kind ``name``."""
    if name not in KINDS:
        raise ValueError(f"unknown model kind {name!r} (known: {', '.join(KINDS)}); the checkpoint was written "
                         "by a newer medtune?")
    module, _, attribute = KINDS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


__all__ = ["DEFAULT_KIND", "KINDS", "MEDTUNE_FILE", "NATIVE_TEMPLATE", "VLM", "kind_class",
           "kind_of_foreign_checkpoint"]
