"""Build a composed vision-language model from named parts, and load any VLM checkpoint.

``build_vlm(ModelSpec)`` assembles vision tower + projector + causal LM (+ tokenizer with an image token,
image processor and chat template) and returns them together as a :class:`~medtune.models.kinds.composed.ComposedVLM`,
so model and preprocessing cannot drift apart. With the ``mlp2x_gelu`` projector the model *is* transformers'
``LlavaForConditionalGeneration`` (loads and serves without medtune); other projectors give a
``medtune_vlm`` model (see medtune_vlm.py). ``load_vlm`` reads back what ``VLM.save`` wrote, as the model kind
its ``medtune.json`` names (:mod:`medtune.models.kinds`), and loads Hugging Face VLMs medtune did not write
(Qwen2-VL, Idefics3, llava-hf ...) as the ``native`` kind, with their own processor and chat template.

Design choices:
- Pretrained parts keep their weights exactly: the tower and the LM are loaded with from_pretrained and
  *moved* into the composed model (the composed shell is built on the meta device, so a 7B LM is never
  allocated twice). Only the projector (and new embedding rows) start random.
- Every setting is explicit in ``ModelSpec``; what the model needs to know at preprocessing time
  (template, pad mode, image tokens per image) is saved next to the weights in ``medtune.json``.
"""
from __future__ import annotations

import json
import logging
import pickle
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from medtune.errors import SpecError
from medtune.models.kinds.base import MEDTUNE_FILE, NATIVE_TEMPLATE, VLM
from medtune.models.kinds.composed import ComposedVLM, composed_processor
from medtune.models.projectors import PROJECTOR_NAMES
from medtune.models.templates import stop_token_ids

log = logging.getLogger(__name__)

FEATURE_SELECTS = ("patch", "cls_patch")
PAD_MODES = ("pad", "resize", "crop")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelSpec:
    """Everything needed to build a composed VLM. Parts are checkpoints (hub name or local path) or
    config dicts with a ``model_type`` (random initialisation)."""

    vision: str | dict[str, Any]
    """Vision tower: a checkpoint (a full CLIP/SigLIP checkpoint is fine: its vision half is used) or a
    config dict such as ``{"model_type": "clip_vision_model", "hidden_size": 32, ...}``."""
    llm: str | dict[str, Any]
    """Causal LM: a checkpoint or a config dict (``model_type`` llama, mistral, phi, stablelm, qwen2 ...)."""
    projector: str = "mlp2x_gelu"
    """One of ``linear``, ``mlp2x_gelu`` (gives a transformers Llava model), ``attn_pool+mlp2x_gelu``."""
    projector_queries: int = 128
    """Learned queries of the attention pool, i.e. image tokens per image (attn_pool only)."""
    projector_heads: int = 8
    """Attention heads of the attention pool; must divide the vision width (attn_pool only)."""
    vision_feature_layer: int = -2
    """Which hidden state of the tower feeds the projector (-2: the penultimate layer, as in LLaVA)."""
    vision_feature_source: str = "hidden_states"
    """``hidden_states`` (``vision_feature_layer`` picks one) or ``last_hidden_state``: the tower's final output,
    after its last norm (PathChat's; a medtune_vlm model, so not with the mlp2x_gelu projector's Llava)."""
    projector_query_width: int | None = None
    """Width of the attention pool's queries when narrower than the tower (PathChat: 768 over 1,024)."""
    vision_feature_select: str = "patch"
    """``patch``: patch tokens only (LLaVA's "default"); ``cls_patch``: CLS + patches ("full")."""
    tokenizer: str | None = None
    """A tokenizer checkpoint, ``"offline"`` (the bundled-text BPE), or None for the LLM checkpoint's own."""
    template: str = "vicuna"
    """medtune chat template name (see medtune.models.templates), stored as the tokenizer's chat_template;
    ``native`` keeps the tokenizer's own chat template (e.g. a Qwen2-Instruct LLM's)."""
    image_size: int | None = None
    """Input resolution in pixels; None takes the tower's. A pretrained tower only accepts its own size."""
    pad_mode: str = "pad"
    """How non-square images become square: ``pad`` with the image mean (LLaVA, PathChat), ``resize``, ``crop``."""
    image_mean: tuple[float, float, float] | None = None
    """Normalisation mean; None takes the tower checkpoint's processor, or the tower family's default."""
    image_std: tuple[float, float, float] | None = None
    """Normalisation std; as image_mean."""
    projector_weights: str | None = None
    """A trained projector to start from instead of a random one: a stage-1 ``mm_projector.bin`` as LLaVA's
    ``--pretrain_mm_mlp_adapter`` takes it (tensors named ``...mm_projector.*``), a safetensors file of them, or
    a LLaVA checkpoint folder holding them; ``linear`` and ``mlp2x_gelu`` projectors."""
    image_token: str = "<image>"
    """Placeholder token for an image in the text; added to the tokenizer if absent."""
    dtype: str = "float32"
    """Weight dtype of the built model: float32, bfloat16 or float16."""
    seed: int = 0
    """Seed for everything that starts random (projector, parts built from configs)."""

    def __post_init__(self) -> None:
        for name in ("vision", "llm"):
            part = getattr(self, name)
            if isinstance(part, dict) and not part.get("model_type"):
                raise SpecError(f"ModelSpec.{name}: a config dict needs a model_type, got keys {sorted(part)}")
            if not isinstance(part, (str, dict)) or part in ("", {}):
                raise SpecError(f"ModelSpec.{name}: give a checkpoint name/path or a config dict, got {part!r}")
        _check_choice("projector", self.projector, PROJECTOR_NAMES)
        _check_choice("vision_feature_select", self.vision_feature_select, FEATURE_SELECTS)
        _check_choice("vision_feature_source", self.vision_feature_source, ("hidden_states", "last_hidden_state"))
        if self.projector_query_width is not None and self.projector != "attn_pool+mlp2x_gelu":
            raise SpecError("ModelSpec.projector_query_width is the attention pool's: projector "
                            f"{self.projector!r} has none")
        _check_choice("pad_mode", self.pad_mode, PAD_MODES)
        _check_choice("dtype", self.dtype, DTYPES)
        from medtune.models.templates import TEMPLATE_NAMES  # light: no torch

        _check_choice("template", self.template, (*TEMPLATE_NAMES, NATIVE_TEMPLATE))
        if self.projector_queries < 1 or self.projector_heads < 1:
            raise SpecError("ModelSpec: projector_queries and projector_heads must be positive")
        if self.image_size is not None and self.image_size < 1:
            raise SpecError(f"ModelSpec.image_size must be positive, got {self.image_size}")
        if self.tokenizer is None and isinstance(self.llm, dict):
            raise SpecError("ModelSpec.tokenizer: an LLM built from a config has no tokenizer of its own; "
                             "set tokenizer to 'offline' or a tokenizer checkpoint")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != 3:
                    raise SpecError(f"ModelSpec.{name} needs 3 values (R, G, B), got {value}")
                setattr(self, name, tuple(float(v) for v in value))

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise SpecError(f"unknown model spec keys {unknown}; known: {sorted(known)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in settings and f.default is MISSING)
        if missing:
            raise SpecError(f"model spec is missing {missing}")
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"ModelSpec.{name}: {value!r} is not one of {', '.join(choices)}")


# ---------------------------------------------------------------------------------------------- build


def build_vlm(spec: ModelSpec, *, llm=None, tokenizer=None) -> ComposedVLM:
    """Assemble the composed model described by ``spec`` (see module docstring); ``llm`` and ``tokenizer``: the
    causal LM and its tokenizer already loaded (an importer's, whose checkpoint transformers cannot load by name,
    or whose tokenizer needs the tokens the checkpoint's own loader adds), instead of ``spec``'s."""
    import torch

    from medtune.models import vision

    torch.manual_seed(spec.seed)
    for name in ("vision", "llm", "tokenizer"):
        _check_local_path(name, getattr(spec, name))
    vision_config = vision.vision_config(spec.vision, spec.image_size)
    tower = vision.load_vision_tower(spec.vision, vision_config, dtype=spec.dtype)
    layout = vision.measure_layout(tower, vision_config)
    _check_feature_layer(spec.vision_feature_layer, layout)
    strategy, tokens_per_image = _feature_selection(spec, layout)

    tokenizer = _with_image_and_pad_tokens(_load_tokenizer(spec) if tokenizer is None else tokenizer, spec)
    llm = _load_llm(spec, tokenizer) if llm is None else llm
    model = _compose(spec, tower, llm, tokenizer, strategy, tokens_per_image)
    if spec.projector_weights:
        _load_projector(model.model.multi_modal_projector, spec)
    model.to(getattr(torch, spec.dtype)).eval()

    if spec.template != NATIVE_TEMPLATE:
        tokenizer.chat_template = chat_template(spec.template)
        model.generation_config.eos_token_id = stop_token_ids(spec.template, tokenizer)
    elif not tokenizer.chat_template:
        raise SpecError("ModelSpec.template 'native' keeps the tokenizer's chat template, but this tokenizer "
                        "has none; pick a medtune template")
    image_processor = vision.image_processor_for(spec.vision, vision_config, spec.image_mean, spec.image_std)
    processor = composed_processor(model.config, tokenizer, image_processor, spec.image_token, tokens_per_image)
    return ComposedVLM(model=model, tokenizer=tokenizer, image_processor=image_processor, processor=processor,
                       template=spec.template, image_token=spec.image_token,
                       image_token_id=tokenizer.convert_tokens_to_ids(spec.image_token),
                       image_tokens_per_image=tokens_per_image, image_size=vision_config.image_size,
                       pad_mode=spec.pad_mode, spec=spec.to_dict())


def _load_projector(projector, spec: ModelSpec) -> None:
    """``spec.projector_weights`` into the composed model's projector; a file that does not fit is one error."""
    from medtune.errors import InputFileError
    from medtune.models.weights import LLAVA_PROJECTOR_KEYS, llava_projector_state

    path = Path(spec.projector_weights).expanduser()
    if spec.projector not in LLAVA_PROJECTOR_KEYS:
        raise SpecError(f"ModelSpec.projector_weights: a {spec.projector} projector cannot start from LLaVA's "
                        f"projector file (only {', '.join(LLAVA_PROJECTOR_KEYS)})")
    if not path.exists():
        raise FileNotFoundError(f"ModelSpec.projector_weights: no file at {path}")
    state = llava_projector_state(path, spec.projector)
    expected = projector.state_dict()
    problems = [f"{name} {tuple(tensor.shape)} where the model has {tuple(expected[name].shape)}"
                for name, tensor in state.items() if name in expected and tensor.shape != expected[name].shape]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if problems or missing or unexpected:
        raise InputFileError(f"{path}: does not fit the {spec.projector} projector ("
                             + "; ".join(problems + [f"missing {missing}"] * bool(missing)
                                         + [f"unexpected {unexpected}"] * bool(unexpected)) + ")")
    projector.load_state_dict({name: tensor.to(expected[name].dtype) for name, tensor in state.items()})


def chat_template(name: str) -> str:
    """The Jinja chat template of the medtune template ``name``."""
    from medtune.models.templates import get_template

    return get_template(name).jinja


def _check_local_path(name: str, source) -> None:
    """A part named like a local path must exist (hub names are checked by from_pretrained)."""
    if isinstance(source, str) and source.startswith(("/", "./", "../", "~")):
        path = Path(source).expanduser()
        if not (path / "config.json").exists() and not (name == "tokenizer" and path.is_dir()):
            raise FileNotFoundError(f"ModelSpec.{name}: no checkpoint at {source} (no config.json)")


def _check_feature_layer(layer: int, layout) -> None:
    count = layout.num_hidden_states
    if not -count <= layer < count:
        raise SpecError(f"vision_feature_layer {layer} is out of range: the tower has {count} hidden states "
                         f"(embeddings + {count - 1} layers), so use {-count}..{count - 1}")


def _feature_selection(spec: ModelSpec, layout) -> tuple[str, int]:
    """LLaVA's vision_feature_select_strategy and the number of image tokens per image."""
    extra = layout.num_extra_tokens
    if extra not in (0, 1):
        raise SpecError(f"the vision tower emits {extra} non-patch tokens per image; only towers with one "
                         "CLS token (CLIP-like) or none (SigLIP-like) are supported")
    if spec.vision_feature_select == "cls_patch" and extra == 0:
        raise SpecError("vision_feature_select 'cls_patch' needs a tower with a CLS token; this one has none")
    # LLaVA's "default" drops the first token (the CLS); "full" keeps all tokens the tower emits.
    strategy = "default" if spec.vision_feature_select == "patch" and extra == 1 else "full"
    tokens = layout.num_patches + (extra if strategy == "full" else 0)
    if spec.projector == "attn_pool+mlp2x_gelu":
        tokens = spec.projector_queries
    return strategy, tokens


def _load_tokenizer(spec: ModelSpec):
    if spec.tokenizer == "offline":
        from medtune.models.tokenizer import offline_tokenizer

        return offline_tokenizer()
    from transformers import AutoTokenizer

    source = spec.tokenizer or spec.llm
    try:
        return AutoTokenizer.from_pretrained(source)
    except (ValueError, ImportError, OSError) as error:
        if _sentencepiece_missing_for(source):
            raise SpecError(f"ModelSpec.tokenizer: {source} is a sentencepiece tokenizer (tokenizer.model, no "
                            "tokenizer.json); reading it needs sentencepiece and protobuf: "
                            "pip install 'medtune[models]'") from error
        raise


def _with_image_and_pad_tokens(tokenizer, spec: ModelSpec):
    """``tokenizer`` with the spec's image token (added after its vocabulary if absent) and a pad token."""
    if spec.image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([spec.image_token], special_tokens=True)
    if tokenizer.pad_token is None:
        # LLaVA pads Llama with unk; any token works as pad since padded positions are masked out.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def _sentencepiece_missing_for(source: str) -> bool:
    """A local tokenizer folder that only sentencepiece can read (Llama 2 style), without sentencepiece installed:
    transformers then falls back to tiktoken and says so, which points the user the wrong way."""
    import importlib.util

    folder = Path(source)
    only_spm = (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file()
    return only_spm and importlib.util.find_spec("sentencepiece") is None


def _load_llm(spec: ModelSpec, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(spec.llm, str):
        # Load straight into the target dtype: a 7B LM in float32 would need twice the memory.
        return AutoModelForCausalLM.from_pretrained(spec.llm, dtype=getattr(torch, spec.dtype))
    settings = dict(spec.llm)
    settings.setdefault("vocab_size", len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        settings.setdefault(name, getattr(tokenizer, name))
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    return AutoModelForCausalLM.from_config(config)


def _compose(spec: ModelSpec, tower, llm, tokenizer, strategy: str, tokens_per_image: int):
    """Put tower, projector and LM into one Llava / medtune_vlm model, moving (not copying) the parts."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from medtune.models.medtune_vlm import MedtuneVLMConfig, MedtuneVLMForConditionalGeneration
    from medtune.models.projectors import build_projector

    common = dict(vision_config=tower.config, text_config=llm.config,
                  image_token_index=tokenizer.convert_tokens_to_ids(spec.image_token),
                  image_seq_length=tokens_per_image, vision_feature_layer=spec.vision_feature_layer,
                  vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
                  tie_word_embeddings=bool(llm.config.tie_word_embeddings))
    lm_head = llm.get_output_embeddings()
    lm_head_bias = getattr(lm_head, "bias", None) is not None
    if spec.projector == "mlp2x_gelu" and not lm_head_bias and spec.vision_feature_source == "hidden_states":
        config, model_class = LlavaConfig(**common), LlavaForConditionalGeneration
    else:
        if spec.projector == "mlp2x_gelu":
            # LLaVA's class has no LM-head bias and would silently drop Phi's; keep it in our class.
            log.warning("the LM head of %s has a bias, which transformers' Llava cannot hold: building a "
                        "medtune_vlm model with the mlp2x_gelu projector instead", llm.config.model_type)
        config = MedtuneVLMConfig(**common, projector_type=spec.projector, projector_queries=spec.projector_queries,
                                  projector_heads=spec.projector_heads, lm_head_bias=lm_head_bias,
                                  projector_query_width=spec.projector_query_width,
                                  vision_feature_source=spec.vision_feature_source)
        model_class = MedtuneVLMForConditionalGeneration
    with torch.device("meta"):
        model = model_class(config)
    model.model.vision_tower = tower
    model.model.language_model = llm.base_model
    model.lm_head = lm_head
    if model_class is LlavaForConditionalGeneration:
        model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    else:
        model.model.multi_modal_projector = build_projector(
            spec.projector, tower.config.hidden_size, llm.config.hidden_size,
            num_queries=spec.projector_queries, num_heads=spec.projector_heads,
            query_width=spec.projector_query_width)
    model.generation_config = llm.generation_config
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise RuntimeError(f"composing the VLM left {name} uninitialised (meta tensor)")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


# ----------------------------------------------------------------------------------------------- load


def load_vlm(name_or_path: str | Path, *, dtype=None, device: str = "cpu") -> VLM:
    """A medtune checkpoint, as the kind its medtune.json records, or a Hugging Face VLM medtune did not write
    (the native kind); a local path or a hub name. A local folder's safetensors headers are checked first and a
    refused pickle is one error naming the file (:mod:`medtune.models.weights`)."""
    from medtune.models.weights import check_safetensors, refused_pickle

    source = str(name_or_path)
    if Path(source).exists() and not (Path(source) / "config.json").exists():
        raise FileNotFoundError(f"{source} is not a model checkpoint (no config.json)")
    if Path(source).is_dir():
        check_safetensors(source)
    try:
        return _load_vlm(source, dtype=dtype, device=device)
    except pickle.UnpicklingError:
        raise refused_pickle(source) from None


def _load_vlm(source: str, *, dtype, device: str) -> VLM:
    from transformers.utils import cached_file

    from transformers import AutoConfig

    from medtune.models.kinds import DEFAULT_KIND, kind_class, kind_of_foreign_checkpoint

    model_kwargs = {"dtype": _torch_dtype(dtype)} if dtype is not None else {}
    metadata_file = cached_file(source, MEDTUNE_FILE, _raise_exceptions_for_missing_entries=False)
    if metadata_file is None:
        kind = kind_of_foreign_checkpoint(AutoConfig.from_pretrained(source))
        return kind_class(kind).load(source, None, model_kwargs=model_kwargs, device=device)
    metadata = json.loads(Path(metadata_file).read_text(encoding="utf-8"))
    kind = kind_class(metadata.get("kind", DEFAULT_KIND))
    return kind.load(source, metadata, model_kwargs=model_kwargs, device=device)


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, str):
        if dtype == "auto":
            return dtype
        _check_choice("dtype", dtype, DTYPES)
        return getattr(torch, dtype)
    return dtype
