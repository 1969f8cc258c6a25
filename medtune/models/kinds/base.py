"""The model-kind interface: what every kind of model answers, so that no caller tests which kind it holds.

A *kind* is how a family of models turns canonical samples into tensors and back. :class:`VLM` is the base
class; each kind is one subclass (``composed``, ``native`` ...), chosen once, where the model is built
(:func:`medtune.models.build.build_vlm`) or loaded (:func:`medtune.models.build.load_vlm`, from the ``kind``
recorded in ``medtune.json``). Train, eval, serve and the demo hold a ``VLM`` and ask it:

========================  ======================================================================================
question                  method
========================  ======================================================================================
sample -> training inputs :meth:`VLM.encode_sample` (ids, labels, pixel / image-token inputs, carried metadata)
prompt for generation     :meth:`VLM.encode_prompt`
the token cache           :meth:`VLM.cache_settings` (None: not cacheable), :meth:`VLM.encode_tokens`,
                          :meth:`VLM.inputs_from_tokens` (late image decoding of a cached row)
batches                   :meth:`VLM.collator` (padding or packing, plus whatever the kind needs)
trainable parts           :meth:`VLM.trainable_parts`, :meth:`VLM.part_of`, :meth:`VLM.module_of`
exact speed-ups           :meth:`VLM.exact_speedups`, :meth:`VLM.training_loss`
losses beside the LM's    :meth:`VLM.auxiliary_loss` (the experts' router losses)
experts                   :meth:`VLM.with_experts`, ``VLM.experts`` (:class:`medtune.models.moe.experts.Experts`)
chat template             :meth:`VLM.use_template`
saving beside the weights :meth:`VLM.save`, :meth:`VLM.write_beside_weights` (the export hook), :meth:`VLM.metadata`
what a person sees        :meth:`VLM.model_view`, :meth:`VLM.describe`
========================  ======================================================================================

Design choices:

* Parts are assigned from module-name *components* (``model.language_model.layers.0.mlp.up_proj.weight`` has
  the component ``language_model``), listed per kind in :attr:`VLM.part_markers`; a parameter that matches no
  part is an error, so a new architecture can never silently train the wrong thing.
* Sample metadata a later stage needs (a domain router needs the image's modality) is named in
  :attr:`VLM.sample_metadata`; it then travels with each encoded sample, through the token cache, collation and
  packing, as the batch's ``sample_metadata`` list (one dict per sample, in the order samples appear in the
  batch) with ``sample_index`` ([B, L]: the sample each position holds, -1 for padding).
  :meth:`VLM.training_loss` takes both out before the model's forward, so a model never sees them.
* Experts are a component, not a kind: any kind whose LLM's decoder layers it knows (:meth:`VLM.decoder_layers`)
  can have FFNs upcycled to experts (:meth:`VLM.with_experts`); the kind then holds an
  :class:`~medtune.models.moe.experts.Experts` in ``experts`` and asks it for the parts, losses and reports that
  depend on the experts alone. A kind whose model class cannot record the experts (a transformers family's own
  class) records them in medtune.json and rebuilds the layers before loading the weights.
* Exact speed-ups change time, never results: the default loss computes the LM head only at positions that
  carry a label (``logits_to_keep`` with a boolean mask) and gives the loss of the full forward pass.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from medtune.models.batch import IGNORE_INDEX, SAMPLE_INDEX, SAMPLE_METADATA
from medtune.models.collate import PadCollator, collate_prompts
from medtune.models.packing import PackingCollator

MEDTUNE_FILE = "medtune.json"
NATIVE_TEMPLATE = "native"
LORA_COMPONENTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def per_row(values, rows, n_rows: int, *, mean: bool = False):
    """[n_rows]: the sum (or, with ``mean``, the mean) of per-token ``values`` by the row each token is in
    (``rows``, as :meth:`VLM.labelled_token_logps` gives them); a row without tokens sums to 0."""
    import torch

    sums = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    if not mean:
        return sums
    return sums / torch.bincount(rows, minlength=n_rows).clamp(min=1).to(sums.dtype)


def recorded_metadata(checkpoint: str | Path) -> dict[str, Any] | None:
    """A local medtune checkpoint's ``medtune.json``, read without loading the model; None for a folder without
    one (a checkpoint medtune did not write) or a hub name."""
    import json

    metadata = Path(checkpoint) / MEDTUNE_FILE
    if not metadata.is_file():
        return None
    return json.loads(metadata.read_text(encoding="utf-8"))


def recorded_template(checkpoint: str | Path) -> str | None:
    """The chat template a local medtune checkpoint's ``medtune.json`` records (None: see :func:`recorded_metadata`)."""
    return (recorded_metadata(checkpoint) or {}).get("template")


def checkpoint_model_class(source: str | Path, metadata: dict[str, Any] | None = None) -> type:
    """The class whose ``from_pretrained`` reads ``source``'s weights as saved, for every loader that does not go
    through the model's kind (merging adapters, QLoRA's quantized base): transformers' Auto class, or, where
    medtune.json records experts that the checkpoint's own class does not (a native or discrete model with
    experts), its family's class building the MoE blocks first. ``metadata``: the medtune.json already read."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    experts = recorded_experts(metadata if metadata is not None else recorded_metadata(source))
    if experts is None:
        return AutoModelForImageTextToText
    config = AutoConfig.from_pretrained(source)
    if getattr(config, "moe", None) is not None:   # medtune_moe_vlm builds its experts from its config
        return AutoModelForImageTextToText
    return with_recorded_experts(AutoModelForImageTextToText._model_mapping[type(config)], experts)


@dataclass(frozen=True)
class Speedups:
    """Exact speed-ups that apply to a model: each leaves the loss and gradients as they were."""

    labelled_positions_head: bool = False
    """LM head and cross-entropy only where a label is (SFT samples train a few of their positions)."""
    frozen_vision_features: bool = False
    """A frozen, deterministic vision tower's features computed once per distinct image and reused."""


@dataclass(kw_only=True)
class VLM(ABC):
    """A model with everything needed to feed it; one subclass per model kind (see the module docstring)."""

    kind: ClassVar[str]
    """The name recorded in ``medtune.json`` (``composed``, ``native`` ...)."""
    parts: ClassVar[tuple[str, ...]] = ("vision", "projector", "llm")
    """The trainable parts of this kind, each with a learning rate in a recipe (LoRA adapters come on top)."""
    part_markers: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = ()
    """(part, module-name components) checked in order: the first part whose component a name has wins."""

    model: Any
    tokenizer: Any
    processor: Any = None
    image_processor: Any = None
    template: str = NATIVE_TEMPLATE
    """medtune chat template name, or ``native`` for the tokenizer's own."""
    image_token: str = "<image>"
    image_token_id: int = -1
    image_size: int = 0
    spec: dict[str, Any] | None = field(default=None, repr=False)
    """The settings the model was built from (composed models), saved in medtune.json."""
    sample_metadata: tuple[str, ...] = ()
    """Sample metadata fields (``modality``, ``organ``, or a key of ``meta.extra``) carried into batches."""
    experts: Any = field(default=None, repr=False)
    """The mixture-of-experts component (:class:`medtune.models.moe.experts.Experts`) once the LLM has experts."""

    # ---- loading ----------------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def load(cls, source: str, metadata: dict[str, Any] | None, *, model_kwargs: dict, device: str) -> VLM:
        """The kind's model and preprocessing from a checkpoint (``metadata``: its medtune.json, or None)."""

    # ---- samples -> model inputs ------------------------------------------------------------------------

    @abstractmethod
    def encode_sample(self, sample, image_root, *, max_length: int, truncation: str = "text",
                      allowed_roots: Sequence = ()) -> dict[str, Any]:
        """A training example: input_ids / attention_mask / labels (lists) and image inputs (tensors or None).

        Raises :class:`medtune.models.processing.SkipSample` for a sample that cannot be used as it is.
        """

    @abstractmethod
    def encode_prompt(self, messages: list[dict], images: list) -> dict[str, Any]:
        """Tensors ([1, L]) for generation: the conversation with the assistant's turn opened."""

    # ---- the token cache --------------------------------------------------------------------------------

    def cache_settings(self) -> dict[str, Any] | None:
        """What, beside data and tokenizer, decides :meth:`encode_tokens`'s output (the cache key); None when
        this kind's encoded samples cannot be cached (they hold processor outputs that depend on the images)."""
        return None

    def encode_tokens(self, sample, *, max_length: int, truncation: str = "text", image_root=None,
                      allowed_roots: Sequence = ()) -> dict[str, list]:
        """The cacheable columns of a sample (ids, labels; no pixels). Only for kinds with cache settings;
        ``image_root`` for kinds whose tokens depend on the images (discrete image codes)."""
        raise NotImplementedError(f"{type(self).__name__} samples are not cacheable")

    def check_images(self, image_refs: list, image_root, *, allowed_roots: Sequence = ()) -> None:
        """Decode a sample's images once (SkipSample("bad image") when one is unusable) before caching it."""
        from medtune.models.processing import load_images

        load_images(image_refs, image_root, allowed_roots=allowed_roots)

    def inputs_from_tokens(self, row: dict[str, Any], image_refs: list, image_root, *,
                           allowed_roots: Sequence = (), memo=None) -> dict[str, Any]:
        """A training example from a cached row (its images decoded now, or reused from ``memo``, a
        :class:`medtune.train.cache.ImageMemo`: the same pixels, decoded once per distinct image)."""
        raise NotImplementedError(f"{type(self).__name__} samples are not cacheable")

    @staticmethod
    def token_row(ids: list[int], labels: list[int], metadata: dict[str, Any] | None) -> dict[str, Any]:
        """A sample's token columns: ids, an all-ones attention mask, labels, and its carried metadata if any."""
        row = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
        if metadata is not None:
            row[SAMPLE_METADATA] = metadata
        return row

    def carried_metadata(self, sample) -> dict[str, Any] | None:
        """The :attr:`sample_metadata` fields of ``sample`` (None when the kind carries none)."""
        if not self.sample_metadata:
            return None
        return {key: metadata_value(sample.meta, key) for key in self.sample_metadata}

    # ---- batches ----------------------------------------------------------------------------------------

    def collator(self, *, packing: bool = False, max_length: int | None = None) -> Callable[[list], dict]:
        """The batch collator of a training stage: right padding, or packing into rows of ``max_length``."""
        if packing:
            return PackingCollator(self.tokenizer.pad_token_id, max_length=max_length)
        return PadCollator(self.tokenizer.pad_token_id)

    # ---- trainable parts --------------------------------------------------------------------------------

    def trainable_parts(self) -> tuple[str, ...]:
        """The kind's :attr:`parts`, and the experts' (``ffn``, ``experts``, ``router``) where it has experts."""
        return self.parts + (self.experts.parts if self.experts is not None else ())

    def part_of(self, parameter_name: str) -> str:
        """The part (one of :meth:`trainable_parts`, or ``lora``) a parameter belongs to, from its dotted name."""
        components = parameter_name.split(".")
        if set(components).intersection(LORA_COMPONENTS):
            return "lora"
        part = self.structural_part(components)
        if part is None:
            raise ValueError(f"parameter {parameter_name!r} belongs to no known part "
                             f"({', '.join(self.trainable_parts())}) {self.unknown_part_hint()}")
        if part == "llm" and self.experts is not None:
            return self.experts.part_within_llm(components) or part
        return part

    def structural_part(self, components: list[str]) -> str | None:
        """The kind's part (vision, projector, llm ...) of a parameter's name components; None if none."""
        found = set(components)
        return next((part for part, markers in self.part_markers if found.intersection(markers)), None)

    def unknown_part_hint(self) -> str:
        """The end of the error for a parameter in no part: where the kind looked."""
        return f"of a {self.kind} model; medtune cannot tell what it should train"

    def lora_scopes(self, on_vision: bool = False, model=None) -> list[str]:
        """Dotted module names in ``model`` (default: this one's) under which LoRA adapters go: the LLM's, and
        the vision tower's when asked."""
        scopes = [self.module_of("llm", model)]
        if on_vision:
            scopes.append(self.module_of("vision", model))
        return scopes

    def module_of(self, part: str, model=None) -> str:
        """The dotted name of the module holding a whole part (e.g. ``model.multi_modal_projector``)."""
        markers = dict(self.part_markers).get(part, ())
        for name, _ in (model if model is not None else self.model).named_modules():
            if name and name.split(".")[-1] in markers:
                return name
        raise ValueError(f"the model has no {part} module (looked for {', '.join(markers) or 'nothing'})")

    # ---- training loss and exact speed-ups --------------------------------------------------------------

    def exact_speedups(self, *, distributed: bool = False) -> Speedups:
        """Which exact speed-ups apply to this model as it will train (see :class:`Speedups`); ``distributed``:
        several processes train it (DDP, FSDP, ZeRO), each through the engine's wrapped forward alone."""
        return Speedups(labelled_positions_head=_accepts_logits_mask(self.model))

    def prepare_training_inputs(self, model, inputs: dict[str, Any], speedups: Speedups) -> dict[str, Any]:
        """The batch as the model's forward takes it under ``speedups`` (unchanged by default)."""
        return inputs

    def training_loss(self, model, inputs: dict[str, Any], num_items_in_batch=None,
                      speedups: Speedups | None = None):
        """(loss, outputs) of a training batch; ``model`` is the (possibly wrapped) model being trained.

        With ``num_items_in_batch`` the loss is the sum over labelled tokens divided by it (Trainer's gradient
        accumulation), else the mean, exactly as the model's own loss.
        """
        batch = inputs
        inputs = {key: value for key, value in inputs.items() if key not in (SAMPLE_METADATA, SAMPLE_INDEX)}
        speedups = self.exact_speedups() if speedups is None else speedups
        inputs = self.prepare_training_inputs(model, inputs, speedups)
        labels = inputs.get("labels")
        if not speedups.labelled_positions_head or labels is None:
            outputs = model(**inputs, **_loss_kwargs(num_items_in_batch))
            loss = outputs.loss
        else:
            loss, outputs = labelled_positions_loss(model, inputs, num_items_in_batch)
        if self.experts is not None:
            self.experts.count_training_tokens(model, batch)
        extra = self.auxiliary_loss(model, inputs, num_items_in_batch)
        if extra is not None:
            loss = loss + extra
            outputs.loss = loss
        return loss, outputs

    def labelled_logps(self, model, inputs: dict[str, Any], speedups: Speedups | None = None):
        """[B] float32: each row's summed log-probability of its labelled tokens (what a preference objective
        compares), through the same inputs and exact speed-ups as :meth:`training_loss`."""
        token_logps, rows = self.labelled_token_logps(model, inputs, speedups)
        return per_row(token_logps, rows, inputs["labels"].shape[0])

    def labelled_token_logps(self, model, inputs: dict[str, Any], speedups: Speedups | None = None, *,
                             temperature: float = 1.0):
        """(log-probabilities [T] float32, row of each [T]) of every labelled token, in row-major order, under the
        distribution sampled at ``temperature`` (the logits divided by it)."""
        import torch

        inputs = {key: value for key, value in inputs.items() if key not in (SAMPLE_METADATA, SAMPLE_INDEX)}
        speedups = self.exact_speedups() if speedups is None else speedups
        inputs = self.prepare_training_inputs(model, inputs, speedups)
        labels = inputs.pop("labels")
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        keep = targets != IGNORE_INDEX
        if speedups.labelled_positions_head and bool(keep.any()):
            logits = model(**inputs, logits_to_keep=keep).logits   # the labelled positions only, in order
        else:
            logits = model(**inputs).logits[keep]
        logits = logits.reshape(-1, logits.shape[-1]).float() / temperature
        token_logps = logits.log_softmax(-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
        return token_logps, keep.nonzero()[:, 0].to(token_logps.device)

    def auxiliary_loss(self, model, inputs: dict[str, Any], num_items_in_batch=None):
        """What the model adds to any training objective's loss, from the forward pass ``model`` just ran on
        ``inputs`` (the experts' router losses, when weighted); None when nothing."""
        if self.experts is None:
            return None
        return self.experts.auxiliary_loss(model, inputs, num_items_in_batch)

    # ---- other kinds made from this one, and stage reports --------------------------------------------------

    def with_experts(self, settings, *, router_state: dict | None = None, domain_field: str = "modality") -> VLM:
        """This model with mixture-of-experts layers upcycled from the FFNs of ``settings``' layers (in place:
        the FFN weights become the experts'), routing statistics grouped by ``domain_field``. The same settings
        again are a no-op (a resumed stage), others an error."""
        from medtune.models.moe.experts import Experts
        from medtune.models.moe.layers import register_expert_layout

        if self.experts is not None:
            self.experts.check_settings(settings)
            return self
        layers = self.decoder_layers()
        hidden_size = self.model.config.get_text_config().hidden_size
        self.experts = Experts.upcycle(layers, settings, hidden_size, router_state=router_state,
                                       domain_field=domain_field)
        register_expert_layout(self.model.get_decoder())
        self.sample_metadata = tuple(dict.fromkeys((*self.sample_metadata, domain_field)))
        return self

    def decoder_layers(self):
        """The language model's decoder layers (the router stage hooks an FFN's input; upcycling replaces FFNs):
        the ``layers`` of the module ``get_decoder()`` returns."""
        layers = getattr(self.model.get_decoder(), "layers", None)
        if layers is None:
            raise ValueError(f"medtune does not know the decoder layers of this {type(self.model).__name__} (its "
                             "get_decoder() has no `layers`), so it cannot route its tokens or give it experts")
        return layers

    def lora_parameter_targets(self) -> list[str]:
        """Parameter names (not modules) LoRA may adapt beside the linear layers, e.g. fused expert weights."""
        if self.experts is None:
            raise ValueError(f"a {self.kind} model without experts has no expert weights for LoRA (lora.on_experts)")
        return self.experts.lora_parameter_targets(self.model)

    def write_stage_report(self, directory: str | Path) -> None:
        """What the model adds to a training stage's outputs: the experts' routing statistics, where it has any."""
        if self.experts is not None:
            self.experts.write_stage_report(self.model, directory)

    def observe_prompts(self, conversations: list, images: list, metadata: list[dict]) -> None:
        """Called by the local eval backend with each batch it answered (and the questions' metadata). A model
        with experts runs one forward pass over the prompts (as generation's prefill sees them) to count which
        expert each domain's prompt tokens go to."""
        if self.experts is None or not any(self.experts.domain_field in m for m in metadata):
            return
        import torch


        encodings = [self.encode_prompt(list(c), list(i)) for c, i in zip(conversations, images)]
        batch = collate_prompts(encodings, self.tokenizer.pad_token_id, self.model)
        with torch.inference_mode():
            self.model(**batch, use_cache=False)
        self.experts.count_prompt_tokens(self.model, batch["attention_mask"], metadata)

    def write_eval_report(self, out_dir: str | Path, *, suffix: str = "") -> list[Path]:
        """Files the model adds to an evaluation run's report (paths): the experts' routing over its prompts."""
        if self.experts is None:
            return []
        return self.experts.write_eval_report(self.model, out_dir, suffix=suffix)

    # ---- templates, labels and generation -----------------------------------------------------------------

    def use_label_rule(self, rule: str) -> None:
        """Which tokens train: ``roles`` (every reply) is the rule of every kind; others are kind-specific."""
        if rule != "roles":
            raise ValueError(f"labels: {rule!r} applies to discrete-token models only; a {self.kind} model "
                             "trains on its replies (roles)")

    def generation_kwargs(self, settings) -> dict[str, Any]:
        """Extra ``generate`` arguments the kind needs for ``settings`` (GenerationSettings); none by default,
        and a clear error when the settings ask for what the kind cannot write (images)."""
        if "image" in settings.modalities:
            raise ValueError(f"a {self.kind} model writes text only; it cannot answer with images")
        return {}

    def placeholder_token_ids(self) -> list[int]:
        """The tokens that stand for an image's (or a video's) features in a prompt: a sampled answer that
        contains one cannot be trained on (its count no longer matches the images), so sampling for training
        suppresses them."""
        config = self.model.config
        found = {self.image_token_id, getattr(config, "image_token_id", None), getattr(config, "image_token_index", None),
                 getattr(config, "video_token_id", None)}
        return sorted(i for i in found if isinstance(i, int) and i >= 0)

    def decode_output(self, ids: list[int]) -> tuple[str, list]:
        """(text, images) of generated token ids; the text without special tokens."""
        return self.tokenizer.decode(ids, skip_special_tokens=True), []

    def use_template(self, name: str) -> None:
        """Replace the chat template (stored with the tokenizer of every checkpoint saved after)."""
        raise ValueError(f"template {name!r} cannot replace a {self.kind} model's own chat template; "
                         "remove template")

    # ---- saving -----------------------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> None:
        """Weights and config (:func:`medtune.models.export.save_model`: safetensors under the key names released
        checkpoints use), then what :meth:`write_beside_weights` adds."""
        from medtune.models.export import save_model

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_model(self.model, out)
        self.write_beside_weights(out)

    def weights_class(self, model=None) -> type:
        """The class whose ``from_pretrained`` reads this model's saved weights back (a Trainer checkpoint on
        resume): ``model``'s own (default: this kind's model), which builds the experts' MoE blocks first where
        the model has experts its class does not record."""
        return with_recorded_experts(type(self.model if model is None else model), self.experts)

    def write_beside_weights(self, out_dir: str | Path) -> None:
        """The export hook: all a checkpoint holds beside its weights and config, so that it loads and serves
        on its own, with medtune and without it (plain transformers, vLLM, SGLang). :meth:`save`, every Trainer
        checkpoint (after Trainer has written the weights) and ``medtune merge`` go through it.

        The contract every kind keeps (an override adds to it and calls this one; docs/serving.md):

        1. Weights, written before this hook by ``save_pretrained``, are safetensors under the key names of
           released checkpoints (``vision_tower.vision_model.*`` ...), whatever the installed transformers'
           module tree: the writer calls :func:`medtune.models.export.use_released_layout` first (``save``
           does; composed models set it when made, for Trainer). A kind whose model keys differ from what its
           released checkpoints or engines use registers a transformers conversion mapping for its class, as the
           MoE kind does for one key per expert (:func:`medtune.models.moe.layers.register_checkpoint_layout`).
        2. The tokenizer with the chat template prompts are built with (tokenizer files, chat_template.jinja)
           and, where the kind has one, the processor plain transformers and vLLM prepare inputs with
           (processor_config.json, preprocessor_config.json): the same prompt ids and the same pixels as
           medtune's own preprocessing, because medtune preprocesses with that processor.
        3. Where the model's class is medtune's own (no native class can hold it): its module files and
           ``auto_map`` in config.json, so ``from_pretrained(path, trust_remote_code=True)`` loads it where
           medtune is not installed (:func:`medtune.models.export.write_remote_code`; skipped for adapters-only
           directories, which have no config.json).
        4. ``medtune.json``: the kind and what medtune's loader needs (:meth:`metadata`).
        """
        from medtune.data.jsonl import write_json
        from medtune.models.export import write_remote_code

        out = Path(out_dir)
        if self.processor is not None:
            self.processor.save_pretrained(out)  # also writes tokenizer, image processor and chat template
        self.tokenizer.save_pretrained(out)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(out)
        write_remote_code(self.model, out)
        write_json(out / MEDTUNE_FILE, self.metadata())

    def attach_decoder(self, source) -> None:
        """Give the model a pixel decoder for the image codes it writes, where it writes any."""
        raise ValueError(f"a {self.kind} model writes no image codes, so it takes no image decoder")

    def save_decoder(self, out_dir) -> None:
        """Write the attached pixel decoder beside the weights (nothing to write for kinds without one)."""

    def export_original_format(self, out_dir: str | Path) -> Path:
        """The model in its family's original (non-Hugging Face) checkpoint layout, where one exists."""
        raise ValueError(f"a {self.kind} model has no original format medtune writes (Chameleon-family models do)")

    def metadata(self) -> dict[str, Any]:
        """medtune.json: the kind and the settings preprocessing needs."""
        from medtune import __version__

        metadata = {"medtune_version": __version__, "kind": self.kind, "template": self.template,
                    "image_token": self.image_token, "image_size": self.image_size, "spec": self.spec,
                    "sample_metadata": list(self.sample_metadata)}
        if self.experts is not None:
            metadata["experts"] = self.experts.record()
        return metadata

    # ---- what a person sees -----------------------------------------------------------------------------

    def model_view(self, image):
        """The image as the model sees it (resized to its input size), for the web page."""
        from PIL import Image

        size = self.image_size or max(image.size)
        return image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)

    def describe(self) -> list[str]:
        """Lines for ``medtune model info`` beyond the parameter count."""
        config = self.model.config
        lines = []
        for label, part in (("vision", getattr(config, "vision_config", None)),
                            ("llm", getattr(config, "text_config", None))):
            if part is not None:
                lines.append(f"{label}: {part.model_type}, {getattr(part, 'num_hidden_layers', '?')} layers, "
                             f"width {getattr(part, 'hidden_size', '?')}")
        lines.append(f"kind: {self.kind}; template: {self.template}; image token {self.image_token!r} "
                     f"(id {self.image_token_id}), {self.image_size} px")
        lines.append(f"vocabulary: {len(self.tokenizer):,} tokens")
        if self.experts is not None:
            lines.insert(-2, self.experts.describe())
        return lines

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def recorded_experts(metadata: dict[str, Any] | None):
    """The :class:`~medtune.models.moe.experts.Experts` a checkpoint's medtune.json records; None for none."""
    record = (metadata or {}).get("experts")
    if record is None:
        return None
    from medtune.models.moe.experts import Experts

    return Experts.from_record(record)


def with_recorded_experts(model_class: type, experts) -> type:
    """``model_class``, or (with ``experts``) the same class building their MoE blocks before it reads a
    checkpoint's weights."""
    if experts is None:
        return model_class
    from medtune.models.moe.experts import with_expert_layers

    return with_expert_layers(model_class, experts)


def metadata_value(meta, key: str):
    """A metadata field by name: a canonical field (modality, organ ...), else a key of ``meta.extra`` (formats
    keep the fields they do not map there)."""
    value = getattr(meta, key, None) if key != "extra" else None
    return value if value is not None else meta.extra.get(key)


# ---- the labelled-positions loss --------------------------------------------------------------------------


def _loss_kwargs(num_items_in_batch) -> dict:
    return {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}


def _accepts_logits_mask(model) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` and transformers slices with a boolean mask."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401  (5.x: masks supported)
    except ImportError:
        return False
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def labelled_positions_loss(model, inputs: dict[str, Any], num_items_in_batch=None):
    """The causal-LM loss with the LM head applied only where the next token is a label.

    Position t predicts token t + 1, so the head runs at positions whose *next* label is not ignored; the
    loss is transformers' ``ForCausalLMLoss`` on those logits with the matching targets, the same sum (and
    the same division) as the full forward pass.
    """
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    labels = inputs["labels"]
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):   # nothing to learn from: the model's own (empty) loss, not an empty mask
        outputs = model(**inputs, **_loss_kwargs(num_items_in_batch))
        return outputs.loss, outputs
    forward = {key: value for key, value in inputs.items() if key != "labels"}
    outputs = model(**forward, logits_to_keep=keep)
    logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
    loss = ForCausalLMLoss(logits, None, logits.shape[-1], num_items_in_batch, shift_labels=targets[keep])
    outputs.loss = loss
    return loss, outputs
