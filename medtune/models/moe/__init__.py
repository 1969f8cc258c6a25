"""Mixture of experts: everything medtune knows about upcycled experts, one module per concept.

* :mod:`~medtune.models.moe.settings`: a recipe's ``moe:`` section and the router stage's settings (plain Python,
  no torch; the presets ``default`` and ``med-moe``).
* :mod:`~medtune.models.moe.layers`: the layers (router, fused experts, the block that replaces an FFN), their
  checkpoint key layout (one key per expert) and the router file.
* :mod:`~medtune.models.moe.experts`: the experts *component* a model kind holds once its LLM has those layers
  (parts, router losses, routing statistics and their reports), whichever kind it is.
* :mod:`~medtune.models.moe.model`: ``medtune_moe_vlm``, the composed model class whose LLM holds those layers
  (and the upcycling of a dense Llava-layout model into it).
* :mod:`~medtune.models.moe.qwen2_export`: the export of a Qwen2 MoE model to transformers' native Qwen2-MoE.

Composed models with experts are the ``moe`` kind (:mod:`medtune.models.kinds.moe`); native models keep their
kind and hold the component. Import names from their module, not from this package: ``settings``, ``layers`` and
``model`` are copied beside a checkpoint's weights as its remote code.
"""
