"""The native kind: a Hugging Face VLM medtune did not compose (Qwen2-VL, Idefics3 / SmolVLM, llava-hf, InternVL ...).

Its own processor does everything: it renders the chat template, expands image tokens (their number may
depend on the image, e.g. Idefics3's tiling or Qwen2-VL's dynamic resolution) and makes the pixel inputs.
Labels come from rendering the conversation's prefixes and counting their tokens: an assistant reply trains the
tokens between the prompt that opens it and the end of its turn. Encoded samples hold processor outputs that
depend on the images, so they are kept in memory rather than in the token cache.

Design choices:

* Parts come from the model's structure, never from its name (:func:`part_layout`): the language model is what
  ``get_decoder()``, ``get_input_embeddings()`` and ``get_output_embeddings()`` return; the vision tower is
  ``get_encoder(modality="image")`` (else the module built from ``config.vision_config``); the projector is what
  writes image features into the language model's width (every module of the model outside those two that holds
  a tensor of the LLM's width, and the tower's own output head where the tower ends in one, as Qwen2-VL's
  merger). Parameters directly on the model (LLaVA-NeXT's ``image_newline``) train with the LLM, as in
  LLaVA-NeXT's own code. A parameter that fits none of these is an error naming it.
* Processors whose family also reads videos (Qwen2-VL, InternVL, SmolVLM) need a video processor, which
  transformers builds only with torchvision. Where it cannot be built, the processor is the family's own class
  without its video part (:func:`image_only_processor_class`): the same image processor, tokenizer, chat
  template and image-token expansion, and the same ``processor_class`` in the files it saves.
* Per-token processor outputs beside the ids (Gemma 3's ``token_type_ids``, Qwen2-VL's ``mm_token_type_ids``)
  travel as token columns: cut with the ids, padded and packed with them (:class:`NativeCollator`).
* Models that derive multimodal rotary positions from a whole row (``get_rope_index``: Qwen2-VL, Qwen2.5-VL)
  get each sample's positions computed once, alone, when it is encoded (``rope_position_ids``, [3, L]); packed
  rows pass them as transformers' packed form, [4, B, L] with the restarting text positions first, so a packed
  sample sees the positions it would see unpacked. Unpacked batches leave positions to the model.
* Packing modes a model cannot run exactly are refused by its collator: an explicit 4-D block mask replaces
  the mask a model builds from token types (Gemma 3's bidirectional attention among an image's tokens).
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

from medtune.models.batch import IGNORE_INDEX, ROPE_POSITIONS
from medtune.models.packing import ATTENTION_MODES, token_columns
from medtune.models.kinds.base import NATIVE_TEMPLATE, VLM, checkpoint_model_class, recorded_experts

log = logging.getLogger(__name__)

PROCESSOR_TOKEN_KEYS = ("input_ids", "attention_mask")


@dataclass(kw_only=True)
class NativeVLM(VLM):
    kind: ClassVar[str] = "native"
    part_markers: ClassVar = ()   # parts come from the module tree (part_layout), not from names

    _layout: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def assemble(cls, model, processor, *, sample_metadata: Sequence[str] = ()) -> NativeVLM:
        """The kind object around a transformers VLM and its processor (what :meth:`load` and the presets make)."""
        tokenizer = processor.tokenizer
        image_token = getattr(processor, "image_token", None) or "<image>"
        # the placeholder the model scatters image features into (Gemma 3's processor names its begin-of-image
        # token instead): the token that truncation must never cut
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(processor, "image_token_id", None) or tokenizer.convert_tokens_to_ids(image_token)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        image_processor = getattr(processor, "image_processor", None)
        vlm = cls(model=model, tokenizer=tokenizer, image_processor=image_processor, processor=processor,
                  template=NATIVE_TEMPLATE, image_token=image_token, image_token_id=int(image_token_id),
                  image_size=processor_image_size(image_processor), sample_metadata=tuple(sample_metadata))
        vlm.layout()   # a model whose parts cannot be found fails here, before any data is read
        return vlm

    @classmethod
    def load(cls, source: str, metadata: dict[str, Any] | None, *, model_kwargs: dict, device: str) -> NativeVLM:
        # a family's own class cannot hold experts: where medtune.json records some, their MoE blocks are built
        # before the weights are read
        model_class = checkpoint_model_class(source, metadata or {})
        model = model_class.from_pretrained(source, **model_kwargs).to(device).eval()
        vlm = cls.assemble(model, load_processor(source), sample_metadata=(metadata or {}).get("sample_metadata", ()))
        vlm.experts = recorded_experts(metadata)
        return vlm

    # ---- samples -> model inputs ------------------------------------------------------------------------

    def encode_sample(self, sample, image_root, *, max_length: int, truncation: str = "text",
                      allowed_roots: Sequence = ()) -> dict[str, Any]:
        from medtune.models.processing import SkipSample, load_images, truncate
        from medtune.models.templates import to_chat_messages

        images = load_images(sample.images, image_root, allowed_roots=allowed_roots)
        messages = to_chat_messages(sample)
        text = self.processor.apply_chat_template(messages, tokenize=False)
        batch = self.processor(text=text, images=images or None, return_tensors="pt")
        ids = batch["input_ids"][0].tolist()
        labels = [IGNORE_INDEX] * len(ids)
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                start = self._prefix_length(messages[:index], images, add_generation_prompt=True)
                end = min(self._prefix_length(messages[:index + 1], images, add_generation_prompt=False), len(ids))
                labels[start:end] = ids[start:end]
        if all(label == IGNORE_INDEX for label in labels):
            raise SkipSample("no assistant reply")
        ids, labels = truncate(ids, labels, self.image_token_id, max_length=max_length, truncation=truncation)
        out: dict[str, Any] = {}
        for key, value in batch.items():
            if key in PROCESSOR_TOKEN_KEYS:
                continue
            if is_token_column(value, batch["input_ids"]):   # one value per token: cut with the ids
                out[key] = value[0, :len(ids)].tolist()
            else:
                out[key] = value
        out.update(input_ids=ids, attention_mask=[1] * len(ids), labels=labels)
        out.setdefault("pixel_values", None)
        if computes_own_positions(self.model):
            out[ROPE_POSITIONS] = self._rope_positions(out)
        carried = self.carried_metadata(sample)
        if carried is not None:
            out["sample_metadata"] = carried
        return out

    def _prefix_length(self, conversation: list[dict], images: list, *, add_generation_prompt: bool) -> int:
        """Tokens of a conversation prefix (with the images its image parts use), as the processor makes them."""
        n_images = sum(1 for m in conversation if not isinstance(m["content"], str)
                       for part in m["content"] if part.get("type") == "image")
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)
        return len(self.processor(text=text, images=images[:n_images] or None)["input_ids"][0])

    def _rope_positions(self, example: dict) -> list[list[int]]:
        """The sample's multimodal rotary positions ([3, L]) as the model computes them for the sample alone."""
        import torch

        grids = {key: example[key] for key in ("image_grid_thw", "video_grid_thw") if example.get(key) is not None}
        types = example.get("mm_token_type_ids") or [0] * len(example["input_ids"])
        with torch.no_grad():
            positions, _ = self.model.base_model.get_rope_index(
                torch.tensor([example["input_ids"]]), mm_token_type_ids=torch.tensor([types]), **grids)
        return positions[:, 0].tolist()

    def encode_prompt(self, messages: list[dict], images: list) -> dict[str, Any]:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return dict(self.processor(text=text, images=images or None, return_tensors="pt"))

    # ---- batches ----------------------------------------------------------------------------------------

    def collator(self, *, packing: bool = False, max_length: int | None = None) -> Callable[[list], dict]:
        return NativeCollator(super().collator(packing=packing, max_length=max_length),
                              self.tokenizer.pad_token_id, packed_modes=self.packing_modes())

    def packing_modes(self) -> tuple[str, ...]:
        """The packed-attention modes that keep this model's samples apart exactly."""
        if uses_token_type_mask(self.model):
            # an explicit 4-D mask replaces the model's own one, which lets image tokens see each other both ways
            return tuple(mode for mode in ATTENTION_MODES if mode != "mask")
        return ATTENTION_MODES

    # ---- trainable parts --------------------------------------------------------------------------------

    def layout(self, model=None) -> PartLayout:
        """The part layout of ``model`` (default: this kind's model), found once per model object."""
        model = self.model if model is None else model
        if model is self.model:
            if self._layout is None or self._layout.model_id != id(model):
                self._layout = part_layout(model)
            return self._layout
        return part_layout(model)

    def structural_part(self, components: list[str]) -> str | None:
        return self.layout().part_of(components)

    def unknown_part_hint(self) -> str:
        return (f"of this {type(self.model).__name__}: it is neither in the language model (get_decoder, "
                "embeddings, head), the vision tower (get_encoder('image')) nor a module that writes into the "
                "language model's width; medtune cannot tell what it should train")

    def module_of(self, part: str, model=None) -> str:
        layout = self.layout(model)
        modules = layout.modules.get(part, ())
        if not modules:
            raise ValueError(f"this {layout.model_class} has no {part} module")
        return modules[0]

    # ---- saving -----------------------------------------------------------------------------------------

    def write_beside_weights(self, out_dir) -> None:
        # the processor (with its image processor and chat template) is what a native checkpoint loads with
        if self.processor is not None:
            self.processor.save_pretrained(out_dir)
        super().write_beside_weights(out_dir)


# ---- parts from the module tree ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PartLayout:
    """Where each part of a model lives: dotted module (or parameter) names, most specific first."""

    model_id: int
    model_class: str
    prefixes: tuple[tuple[tuple[str, ...], str], ...]
    """(name components, part), longest first: a parameter belongs to the part of the longest prefix it holds."""
    modules: dict[str, tuple[str, ...]]
    """part -> the modules that hold it (the first one is what LoRA scopes and ``modules_to_save`` name)."""

    def part_of(self, components: list[str]) -> str | None:
        # Wrappers add components around the model's own names (PEFT's base_model.model., base_layer,
        # modules_to_save.default ...), so a prefix matches wherever its components appear in a row.
        for prefix, part in self.prefixes:
            width = len(prefix)
            if any(tuple(components[i:i + width]) == prefix for i in range(len(components) - width + 1)):
                return part
        return None


def part_layout(model) -> PartLayout:
    """The vision / projector / llm layout of a transformers VLM, from its structure (module docstring)."""
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    width = model.get_input_embeddings().embedding_dim   # the language model's width
    # decoder first: it is the module LoRA adapters go under
    llm = list(dict.fromkeys(names[id(m)] for m in (model.get_decoder(), model.get_input_embeddings(),
                                                    model.get_output_embeddings()) if m is not None))
    vision_module = _vision_tower(model)
    vision = names[id(vision_module)]
    others = [names[id(m)] for m in _other_encoders(model)]

    # the tower's output head: children after its layer stack that write the language model's width
    stack = _layer_stack(vision_module)
    projector = [f"{vision}.{child_name}" for child_name, child in vision_module.named_children()
                 if child is not stack and not _contains(child, stack) and _last_linear_out(child) == width]
    # modules outside the tower and the LLM that hold a tensor of the LLM's width: the connector between them
    taken = [*llm, vision, *others, *projector]
    base = model.base_model
    base_name = names.get(id(base), "")
    for child_name, child in base.named_children():
        name = f"{base_name}.{child_name}" if base_name else child_name
        if any(_under(name, t) or _under(t, name) for t in taken):
            continue
        if any(width in p.shape for p in child.parameters()):
            projector.append(name)
    # parameters directly on the model (LLaVA-NeXT's image_newline, in the LLM's embedding space) train with the
    # LLM, as LLaVA-NeXT's own training groups them
    loose = [f"{base_name}.{n}" if base_name else n for n, p in base.named_parameters(recurse=False)
             if p.dim() >= 1 and width in p.shape]
    prefixes = [(tuple(n.split(".")), "llm") for n in [*llm, *loose]]
    prefixes += [(tuple(vision.split(".")), "vision")] + [(tuple(n.split(".")), "projector") for n in projector]
    prefixes.sort(key=lambda item: -len(item[0]))
    return PartLayout(model_id=id(model), model_class=type(model).__name__, prefixes=tuple(prefixes),
                      modules={"llm": tuple(llm), "vision": (vision,), "projector": tuple(projector)})


def _vision_tower(model):
    """``get_encoder(modality="image")``, else the module whose config is ``config.vision_config``."""
    tower = model.get_encoder(modality="image") if _has_modal_encoder(model) else None
    if tower is None or tower is model or tower is model.base_model:
        vision_config = getattr(model.config, "vision_config", None)
        tower = next((m for m in model.modules() if vision_config is not None and m is not model
                      and getattr(m, "config", None) is vision_config), None)
    if tower is None:
        raise ValueError(f"{type(model).__name__} has no vision tower (get_encoder('image') returns the model "
                         "itself and no module is built from config.vision_config): not a vision-language model")
    return tower


def _has_modal_encoder(model) -> bool:
    return "modality" in inspect.signature(model.get_encoder).parameters


def _other_encoders(model) -> list:
    """Encoders of modalities medtune does not train (an audio tower): their parameters belong to no part."""
    if not _has_modal_encoder(model):
        return []
    encoder = model.get_encoder(modality="audio")
    return [] if encoder is model or encoder is model.base_model else [encoder]


def _layer_stack(module):
    """The module's largest ``nn.ModuleList`` (its encoder layers), or None."""
    import torch

    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def _contains(module, target) -> bool:
    return target is not None and any(m is target for m in module.modules())


def _last_linear_out(module) -> int | None:
    import torch

    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1].out_features if linears else None


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# ---- processors ------------------------------------------------------------------------------------------


@functools.cache
def image_only_processor_class(base: type) -> type:
    """``base`` (a processor class that also reads videos) without its video part, under the same name.

    transformers derives a processor's parts from its ``__init__`` signature, so a subclass whose ``__init__``
    takes no video processor is built from an image processor and a tokenizer alone; everything else (chat
    template, image-token expansion, ``__call__``) is the family's own code, and the class name it saves as
    ``processor_class`` is the family's. Its chat template is rendered by the generic ``apply_chat_template``
    (SmolVLM's override only adds video defaults).
    """
    from transformers import ProcessorMixin

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                      chat_template=chat_template, **kwargs)

    # the family's own signature less the video processor: transformers reads a processor's parts and the
    # settings it saves (InternVL's image_seq_length ...) from it
    signature = inspect.signature(base.__init__)
    __init__.__signature__ = signature.replace(
        parameters=[p for name, p in signature.parameters.items() if name != "video_processor"])

    namespace = {"__init__": __init__, "__module__": base.__module__, "__qualname__": base.__qualname__,
                 "__doc__": f"{base.__name__} without its video processor (medtune: torchvision is not importable)",
                 "apply_chat_template": ProcessorMixin.apply_chat_template}
    return type(base.__name__, (base,), namespace)


def reads_videos(processor_class: type) -> bool:
    return "video_processor" in processor_class.get_attributes()


def video_processors_available() -> bool:
    """Whether transformers can build video processors here (they need an importable torchvision)."""
    try:
        import torchvision  # noqa: F401
    except Exception:   # not installed, or a build for another torch (a CUDA wheel on a CPU torch)
        return False
    return True


def make_processor(processor_class: type, image_processor, tokenizer, *, chat_template: str | None = None,
                   **settings):
    """``processor_class`` from its parts; a class that also reads videos is built without its video part."""
    if reads_videos(processor_class):
        processor_class = image_only_processor_class(processor_class)
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                           **settings)


def load_processor(source: str):
    """The checkpoint's processor: AutoProcessor, or (where its video part cannot be built here) the same class
    from the checkpoint's image processor, tokenizer, chat template and settings, without the video part."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source)
    except Exception as error:
        processor_class = _saved_processor_class(source)
        if processor_class is None or not reads_videos(processor_class) or video_processors_available():
            raise
        log.info("%s: building %s without its video processor (%s: %s)", source, processor_class.__name__,
                 type(error).__name__, error)
    return _image_only_from_files(source, processor_class)


def _saved_processor_class(source: str):
    import json
    from pathlib import Path

    import transformers
    from transformers.utils import cached_file

    path = cached_file(source, "processor_config.json", _raise_exceptions_for_missing_entries=False)
    if path is None:
        return None
    name = json.loads(Path(path).read_text(encoding="utf-8")).get("processor_class")
    return getattr(transformers, name, None) if name else None


def _image_only_from_files(source: str, processor_class: type):
    import json
    from pathlib import Path

    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import cached_file

    saved = json.loads(Path(cached_file(source, "processor_config.json")).read_text(encoding="utf-8"))
    accepted = inspect.signature(processor_class.__init__).parameters
    settings = {key: value for key, value in saved.items()
                if key in accepted and key not in processor_class.get_attributes() and key != "chat_template"}
    tokenizer = AutoTokenizer.from_pretrained(source)
    template_file = cached_file(source, "chat_template.jinja", _raise_exceptions_for_missing_entries=False)
    chat_template = Path(template_file).read_text(encoding="utf-8") if template_file else tokenizer.chat_template
    return make_processor(processor_class, AutoImageProcessor.from_pretrained(source), tokenizer,
                          chat_template=chat_template, **settings)


# ---- batches ----------------------------------------------------------------------------------------------


def computes_own_positions(model) -> bool:
    """Whether the model derives multi-dimensional (multimodal rotary) positions from each row itself
    (``get_rope_index``: Qwen2-VL, Qwen2.5-VL, GLM-4V ...), which restarted 1-D positions cannot express."""
    return callable(getattr(model.base_model, "get_rope_index", None))


def uses_token_type_mask(model) -> bool:
    """Whether the model builds its attention mask from per-token types (Gemma 3: image tokens see each other
    both ways), which an explicit 4-D mask would replace."""
    return "token_type_ids" in inspect.signature(model.forward).parameters


def is_token_column(value, input_ids) -> bool:
    """Whether a processor output has one value per token (shape [1, L] like the ids)."""
    return hasattr(value, "shape") and tuple(value.shape) == tuple(input_ids.shape)


@dataclass
class NativeCollator:
    """Wraps a padding or packing collator for processor outputs it does not know.

    * Token columns (lists as long as the ids: ``token_type_ids``, ``mm_token_type_ids``) are padded with 0
      like the ids (packed rows carry them themselves, :func:`medtune.models.packing.pack_rows`).
    * Per-sample image stacks ([1, images, C, H, W], Idefics3's) with different image counts are padded with
      all-zero images, which those models skip, so that they concatenate over the batch.
    """

    collator: Callable[[list], dict]
    pad_token_id: int
    packed_modes: tuple[str, ...] = ()

    def check_packing_mode(self, mode: str) -> None:
        """Refuse a packed-attention mode that would not keep this model's samples apart exactly."""
        if mode not in self.packed_modes:
            raise ValueError(f"packing mode {mode!r} is not exact for this model (its own attention mask gives "
                             f"image tokens more than a causal view); use one of {', '.join(self.packed_modes)}")

    def __call__(self, features: list) -> dict:
        import torch

        # copies: padding image stacks must not change the dataset's rows
        if features and not isinstance(features[0], dict):
            features = [[dict(sample) for sample in row] for row in features]
            samples = [sample for row in features for sample in row]
        else:
            features = samples = [dict(sample) for sample in features]
        _pad_image_stacks(samples)
        batch = self.collator(features)
        if "position_ids" in batch:
            return batch   # packed rows carry the token columns themselves
        width = batch["input_ids"].shape[1]
        for key in token_columns(samples):
            column = torch.zeros((len(samples), width), dtype=torch.long)
            for row, sample in enumerate(samples):
                values = sample.get(key) or [0] * len(sample["input_ids"])
                column[row, :len(values)] = torch.tensor(values, dtype=torch.long)
            batch[key] = column
        return batch


def _pad_image_stacks(samples: list[dict]) -> None:
    """Pad per-sample image stacks ([1, images, ...]: pixels and their masks) to the batch's largest image count,
    in place (``samples`` are the collator's copies)."""
    import torch

    for key in {k for s in samples for k, v in s.items() if hasattr(v, "dim") and v.dim() >= 4}:
        stacks = [s[key] for s in samples if s.get(key) is not None]
        # only stacks that differ in their image count alone can be padded to one shape
        if len({t.shape[1] for t in stacks}) == 1 or len({(t.dim(), *t.shape[2:]) for t in stacks}) != 1:
            continue
        count = max(t.shape[1] for t in stacks)
        for sample in samples:
            value = sample.get(key)
            if value is not None and value.shape[1] < count:
                pad = torch.zeros((value.shape[0], count - value.shape[1], *value.shape[2:]), dtype=value.dtype)
                sample[key] = torch.cat([value, pad], dim=1)


def processor_image_size(image_processor) -> int:
    """The square side the processor produces, best effort (native processors may resize dynamically)."""
    for name in ("crop_size", "size"):
        size = getattr(image_processor, name, None)
        if isinstance(size, int):
            return size
        for key in ("height", "shortest_edge", "longest_edge"):
            # transformers 5 keeps sizes as dicts or SizeDict objects (attribute access).
            value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
            if value:
                return int(value)
    return 0
