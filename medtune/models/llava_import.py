"""``medtune model import``: a checkpoint written by LLaVA / LLaVA-Med's own code, as a medtune composed model.

LLaVA 1.1.x (``model_type: llava``, which is not transformers' Llava), LLaVA >= 1.2 (``llava_llama``) and
LLaVA-Med v1.5 (``llava_mistral``) save one causal LM whose state dict also holds ``model.mm_projector.*`` and,
when the tower was loaded at save time, a copy of it under ``model.vision_tower.vision_tower.*``; their config
adds ``mm_*`` keys. Their loading code takes the LM and projector from the checkpoint and the vision tower from
the checkpoint *named* by ``mm_vision_tower`` (the copy in the state dict is dropped), so the import does the
same (``--vision-tower`` points at a local copy of that tower). The result is transformers'
``LlavaForConditionalGeneration`` (``mlp2x_gelu``) or medtune's class (``linear``), saved by medtune with the
chat template of the LLaVA conversation mode it was evaluated with.

What changes the computation is carried over or refused by name (facts from microsoft/LLaVA-Med d406e3f and
haotian-liu/LLaVA v1.1.3 / main: ``llava_arch.py``, ``clip_encoder.py``, ``multimodal_projector/builder.py``,
``mm_utils.py``, ``conversation.py``):

* ``mm_vision_select_layer`` -> the tower's hidden state fed to the projector; ``mm_vision_select_feature``
  ``patch`` (CLS dropped) or ``cls_patch`` (kept);
* ``mm_projector_type`` ``mlp2x_gelu`` (``mm_projector.0`` / ``.2``, exact GELU) or ``linear``; the others
  (``mlpNx_gelu`` for N > 2, ``identity``) are refused; PathChat's ``attn_pool+mlp2x_gelu`` checkpoints are
  read by :mod:`medtune.models.pathchat_import`;
* ``image_aspect_ratio`` ``pad`` (square with the processor's mean colour) or ``square`` / absent (the tower
  processor's resize and centre crop); ``anyres`` is refused, and so are ``mm_patch_merge_type`` other than
  ``flat``, ``mm_use_im_start_end`` (tokens around each image that medtune's templates do not write) and
  ``unfreeze_mm_vision_tower`` (a tower trained with the model, whose weights are the checkpoint's own);
* the tokenizer is the checkpoint's, with ``<im_patch>`` where LLaVA's loader adds it and medtune's image token
  after the vocabulary (LLaVA marks the image with the id -200 inside its code, which no tokenizer holds).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from medtune.errors import InputFileError, SpecError
from medtune.models.weights import LLAVA_PROJECTOR_KEYS   # the projectors whose tensors medtune can read


LANGUAGE_MODELS = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
MODEL_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral", "llava": "llama"}
# LLaVA conversation modes medtune's templates render exactly (conversation.py: system prompt, roles, separators).
CONV_MODES = {"mistral_instruct": "mistral_instruct", "vicuna_v1": "vicuna_v1", "llava_v1": "vicuna",
              "llava_llama_2": "llava_llama_2"}
DEFAULT_CONV_MODE = {"mistral": "mistral_instruct", "llama": "llava_v1"}   # LLaVA-Med's README; LLaVA's model_vqa
SQUARING = {"pad": "pad", "square": "crop", None: "crop"}   # anything else: the CLIP processor's resize + crop
# Keys LLaVA adds to the LM's config; none of them is the LM's.
LLAVA_KEYS = ("use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "image_aspect_ratio",
              "image_grid_pinpoints", "tokenizer_padding_side", "tokenizer_model_max_length", "feature_outs",
              "img_size", "vision_backbone", "segtok_posembed", "unfreeze_mm_vision_tower")
IM_PATCH = "<im_patch>"


@dataclass
class LlavaLayout:
    """What a LLaVA checkpoint's config says, read without transformers (its model_type may clash)."""

    source: Path
    language_model: str        # llama | mistral
    text_settings: dict        # the LM's own config keys
    vision_tower: str
    projector: str
    select_layer: int
    select_feature: str
    pad_mode: str
    patch_token: bool          # LLaVA's loader adds <im_patch> to the tokenizer (the key absent counts as true)

    @classmethod
    def read(cls, source: str | Path) -> "LlavaLayout":
        source = Path(source)
        path, raw = checkpoint_config(source)
        language_model = _language_model(raw, path)
        problems = _refusals(raw)
        if problems:
            raise SpecError(f"{path}: cannot import this LLaVA checkpoint: " + "; ".join(problems))
        settings = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in LLAVA_KEYS
                    and k not in ("architectures", "model_type", "_name_or_path", "transformers_version")}
        return cls(source=source, language_model=language_model, text_settings=settings,
                   vision_tower=raw["mm_vision_tower"], projector=raw.get("mm_projector_type", "linear"),
                   select_layer=int(raw.get("mm_vision_select_layer", -1)),
                   select_feature=raw.get("mm_vision_select_feature", "patch"),
                   pad_mode=SQUARING[raw.get("image_aspect_ratio")],
                   patch_token=bool(raw.get("mm_use_im_patch_token", True)))


def checkpoint_config(source: Path) -> tuple[Path, dict]:
    """``source``'s config.json, path and content, read without transformers (a seed's model type may clash)."""
    path = source / "config.json"
    if not path.is_file():
        raise InputFileError(f"{source}: not a checkpoint folder (no config.json)")
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise InputFileError(f"{path}: not valid JSON ({error})") from None


def _language_model(raw: dict, path: Path) -> str:
    if "mm_vision_tower" not in raw or "text_config" in raw:
        raise SpecError(f"{path}: not a LLaVA checkpoint as LLaVA's own code saves it (no mm_vision_tower, or a "
                        "transformers Llava config; load that one directly)")
    for architecture in raw.get("architectures") or ():
        if architecture in LANGUAGE_MODELS:
            return LANGUAGE_MODELS[architecture]
    if raw.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[raw["model_type"]]
    raise SpecError(f"{path}: model_type {raw.get('model_type')!r} / architectures {raw.get('architectures')} "
                    f"is not one LLaVA writes ({', '.join(MODEL_TYPES)})")


def projector_and_feature_refusals(raw: dict, projector_key: str, seed: str) -> list[str]:
    """The LLaVA family's projector (named by ``projector_key``: LLaVA's ``mm_projector_type``, MoE-LLaVA's
    ``image_projector_type``) and tower-feature settings medtune does not reproduce, by name."""
    problems = []
    projector = raw.get(projector_key, "linear")
    if projector not in LLAVA_PROJECTOR_KEYS:
        problems.append(f"{projector_key} {projector!r} (medtune imports {', '.join(LLAVA_PROJECTOR_KEYS)})")
    if raw.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        problems.append(f"mm_vision_select_feature {raw['mm_vision_select_feature']!r} ({seed} itself raises)")
    return problems


def _refusals(raw: dict) -> list[str]:
    """Each setting that would change the computation in a way medtune does not reproduce, by name."""
    problems = projector_and_feature_refusals(raw, "mm_projector_type", "LLaVA")
    if raw.get("image_aspect_ratio") not in SQUARING:
        problems.append(f"image_aspect_ratio {raw['image_aspect_ratio']!r} (medtune imports pad and square)")
    if raw.get("mm_patch_merge_type", "flat") != "flat":
        problems.append(f"mm_patch_merge_type {raw['mm_patch_merge_type']!r} (only flat)")
    if raw.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end: true (<im_start>/<im_end> around each image)")
    if raw.get("unfreeze_mm_vision_tower"):
        problems.append("unfreeze_mm_vision_tower: true (the tower was trained and its weights are the "
                        "checkpoint's; medtune takes the tower mm_vision_tower names)")
    return problems


def import_llava(source: str | Path, out: str | Path, *, vision_tower: str | None = None,
                 conv_mode: str | None = None, dtype: str = "float32"):
    """Write the medtune checkpoint of a LLaVA / LLaVA-Med checkpoint folder ``source`` into ``out``; returns the
    loaded :class:`~medtune.models.kinds.composed.ComposedVLM`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from medtune.models.build import ModelSpec, build_vlm

    layout = LlavaLayout.read(local_folder(source))
    mode = conv_mode or DEFAULT_CONV_MODE[layout.language_model]
    if mode not in CONV_MODES:
        raise SpecError(f"conversation mode {mode!r}: medtune renders {', '.join(CONV_MODES)} as LLaVA does")
    tower = vision_tower or tower_source(layout.source, layout.vision_tower)
    text_config = AutoConfig.for_model(layout.language_model, **layout.text_settings)
    # the LM's keys (model.*, lm_head.*) load as they are; mm_projector (read below) and the tower's copy (LLaVA's
    # loader drops it too) are the checkpoint's other keys, which transformers would list as unexpected
    with quiet_transformers():   # ... and that llava_mistral is not a model type it knows
        llm = AutoModelForCausalLM.from_pretrained(str(layout.source), config=text_config,
                                                   dtype=getattr(torch, dtype))
        tokenizer = _tokenizer_as_loaded(layout.source, layout.patch_token)
    spec = ModelSpec(vision=tower, llm=str(layout.source), projector=layout.projector,
                     vision_feature_layer=layout.select_layer, vision_feature_select=layout.select_feature,
                     tokenizer=str(layout.source), template=CONV_MODES[mode], pad_mode=layout.pad_mode, dtype=dtype,
                     projector_weights=str(layout.source))
    vlm = build_vlm(spec, llm=llm, tokenizer=tokenizer)
    vlm.save(out)
    return vlm


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings off for a moment: what it would say about a LLaVA checkpoint is expected here."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _tokenizer_as_loaded(source: Path, patch_token: bool):
    """The checkpoint's tokenizer with the token LLaVA's loader adds before it resizes the LM's embeddings:
    ``<im_patch>`` where ``mm_use_im_patch_token`` is true or absent (it never appears in a v1 prompt, but it
    holds a row of the embeddings, so medtune's image token must come after it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if patch_token and IM_PATCH not in tokenizer.get_vocab():
        tokenizer.add_tokens([IM_PATCH], special_tokens=True)
    return tokenizer


def local_folder(source: str | Path) -> Path:
    """``source`` itself when it is on disk, else the hub repository it names, downloaded (weights, config,
    tokenizer; what is cached already is not fetched again)."""
    if Path(source).exists():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.model", "*.bin",
                                                                "*.txt"]))


def tower_source(source: Path, named: str) -> str:
    """The tower a checkpoint's config names (``mm_vision_tower``, Med-MoE's ``mm_image_tower``): a hub name, an
    absolute path, or a folder relative to the checkpoint."""
    beside = source / named
    return str(beside) if not Path(named).is_absolute() and (beside / "config.json").is_file() else named
