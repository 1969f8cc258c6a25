"""Training recipes: a model and a list of stages, read from YAML and checked before any work starts.

A recipe is configuration, not code (DESIGN principle 5). Stages differ in their data, in which parts of the
model train and at which learning rate (0 = frozen), and in the usual loop settings; stage n+1 starts from
stage n's output.

Design choices:

* Every section is a dataclass with one comment per field; :func:`parse_recipe` walks the YAML against those
  type hints, so an unknown key, a wrong type or an impossible combination fails with the key's path, e.g.
  ``stages[1].lr.projectr: unknown key (did you mean projector?)``. Nothing heavy is imported here, so a bad
  recipe fails in milliseconds.
* A recipe may have a ``defaults`` mapping merged under every stage, so that recipes list only what changes
  from stage to stage.
* ``key=value`` overrides address the raw YAML by dotted path (``stages.0.max_steps=3``, ``stages.*.lr.llm=0``)
  and are applied before validation, so an override is checked exactly like the file. ``tiny=true`` swaps in
  the tiny preset model, the bundled VQA-RAD data and two steps per stage (:func:`make_tiny`), so every shipped
  recipe can be exercised on a CPU in seconds.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from medtune.errors import RecipeError
from medtune.models.moe_settings import MoESettings, RouterTraining   # plain Python, no torch


@dataclass
class DataSpec:
    """Where a stage's samples come from: one file in a known format, or a mixture of datasets."""

    path: str | None = None            # a data file (canonical .jsonl, or any format medtune reads)
    format: str = "canonical"          # a name from medtune.data.formats.FORMATS
    image_root: str | None = None      # root of relative image paths; default: the data file's directory
    mixture: str | None = None         # a `medtune mix` YAML or a GMAI-VL list JSON, instead of `path`
    limit: int | None = None           # use only the first N samples (smoke tests, tiny runs)
    truncation: Literal["text", "drop"] = "text"   # over-long samples: cut text only, or drop and count
    strict: bool = False               # stop at the first bad record instead of skipping and counting it
    # Which tokens train: every reply (roles), or MedMax's rule for discrete-token models: everything after the
    # first end-of-turn token (first_separator).
    labels: Literal["roles", "first_separator"] = "roles"
    # Discrete-token models: precomputed image codes (`medtune tokenize-images` output, or MedMax's Parquet);
    # images without codes there are encoded by the model's VQ.
    image_codes: str | None = None


@dataclass
class LearningRates:
    """Peak learning rate of each trainable part; 0 freezes the part."""

    vision: float = 0.0      # the vision encoder
    projector: float = 0.0   # the vision-to-language projector
    llm: float = 0.0         # the language model, fully fine-tuned (embeddings and head included)
    lora: float = 0.0        # the LoRA adapters (needs a `lora` section)
    # mixture-of-experts models only (a stage with a `moe` section, or a model made by one):
    experts: float = 0.0     # the routed experts and the shared expert of every MoE layer
    router: float = 0.0      # the router (gate) of every MoE layer
    ffn: float = 0.0         # the FFNs of the layers without experts (Med-MoE trains them in stage 3)


PARTS = ("vision", "projector", "llm", "lora", "experts", "router", "ffn")
MOE_PARTS = ("experts", "router", "ffn")


@dataclass
class LoraSpec:
    """LoRA adapters through PEFT on the language model (and optionally the vision encoder)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Linear layer names inside the LLM (and vision tower, with `on_vision`) that get adapters.
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    on_vision: bool = False                 # also adapt the vision tower's matching layers
    on_experts: bool = False                # MoE models: adapters on every expert's fused weights too (rank r each)
    quantize: Literal["4bit", "8bit"] | None = None   # QLoRA: needs CUDA and bitsandbytes


@dataclass
class Stage:
    """One training stage: its data, what trains, and the loop settings Trainer receives."""

    name: str
    data: DataSpec
    lr: LearningRates = field(default_factory=LearningRates)
    lora: LoraSpec | None = None
    eval_data: DataSpec | None = None   # optional held-out data, evaluated every `eval_steps`
    epochs: float = 1.0                 # passes over the data; ignored when max_steps is set
    max_steps: int | None = None        # optimizer steps; overrides epochs
    schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 1                 # per device
    grad_accum: int = 1                 # gradient accumulation steps
    max_length: int = 2048              # tokens per sample (per packed row with packing)
    packing: bool = False               # pack several samples per row (attention kept apart)
    group_by_length: bool = False       # batch samples of similar length (less padding, no packing)
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    template: str | None = None         # chat template for this stage; default: the recipe model's
    # Mixture of experts: the FFNs of the chosen layers become experts before this stage trains (keys of
    # medtune.models.moe_settings.MoESettings, plus `preset: default | med-moe` and `router: random | FILE |
    # stage:NAME`, the router file a router stage of this recipe wrote).
    moe: dict | None = None
    # A router stage: instead of training the model, fit a domain classifier on its hidden states and save it as
    # the router file an MoE stage loads (medtune.models.moe_settings.RouterTraining).
    router: RouterTraining | None = None
    save_steps: int = 500
    eval_steps: int | None = None
    log_steps: int = 10
    keep_last_k: int = 2                # complete checkpoints kept on disk
    dataloader_workers: int = 0


@dataclass
class DistributedSpec:
    """How the stage is sharded when launched with torchrun / accelerate launch (1 process: ignored)."""

    # ddp: replicate; fsdp2: shard parameters, gradients and optimizer state (FSDP2 via Accelerate);
    # zero2 / zero3: DeepSpeed (optional extra `medtune[deepspeed]`).
    strategy: Literal["ddp", "fsdp2", "zero2", "zero3"] = "ddp"
    deepspeed_config: str | None = None   # a DeepSpeed JSON of your own instead of the built-in zero2/zero3
    fsdp_config: dict = field(default_factory=dict)   # extra keys passed to Trainer's fsdp_config
    backend: str | None = None           # torch.distributed backend (nccl on GPU, gloo on CPU by default)


@dataclass
class Recipe:
    """A model and its training stages."""

    model: str | dict                   # a checkpoint path / HF VLM name, or a ModelSpec mapping to compose one
    output_dir: str
    stages: list[Stage]
    description: str = ""
    seed: int = 42
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])   # + wandb, mlflow if installed
    cache_dir: str | None = None        # token cache (default: $MEDTUNE_CACHE/tokens, ~/.cache/medtune/tokens)
    tiny_preset: str = "tiny"           # the model preset the tiny override (--tiny) swaps in
    defaults: dict = field(default_factory=dict)   # merged under every stage (already applied once parsed)


REPORTERS = ("tensorboard", "wandb", "mlflow", "none")


# ---- reading -------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] = (), *, tiny: bool = False) -> Recipe:
    """Read a recipe YAML, apply ``key=value`` overrides (and the tiny swap), and validate it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping with model, output_dir and stages")
    overrides = list(overrides)
    tiny = tiny or _pop_tiny(overrides)
    if tiny:   # first, so that explicit overrides still win (`--tiny stages.1.max_steps=5`)
        raw = make_tiny(raw)
    raw = apply_overrides(raw, overrides)
    try:
        return parse_recipe(raw)
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None


def _pop_tiny(overrides: list[str]) -> bool:
    """``tiny=true`` is not a recipe key but a switch; remove it from the overrides and report it."""
    for item in list(overrides):
        key, _, value = item.partition("=")
        if key.strip() == "tiny":
            overrides.remove(item)
            return bool(yaml.safe_load(value)) if value else True
    return False


def parse_recipe(raw: dict) -> Recipe:
    """Validate a raw recipe mapping into a :class:`Recipe` (types, unknown keys, then cross-field rules)."""
    raw = copy.deepcopy(raw)
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RecipeError("defaults: must be a mapping of stage settings")
    stages = raw.get("stages")
    if isinstance(stages, list) and defaults:
        _check_keys(defaults, Stage, "defaults")
        raw["stages"] = [_deep_merge(defaults, s) if isinstance(s, dict) else s for s in stages]
    recipe = _build(Recipe, raw, "")
    validate(recipe)
    return recipe


def _deep_merge(base: dict, top: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ---- typed construction ---------------------------------------------------------------------------------


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _check_keys(data: dict, cls: type, path: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
            raise RecipeError(f"{_join(path, str(key))}: unknown key{hint}")


def _build(cls: type, data: Any, path: str):
    """Make a dataclass ``cls`` from ``data``, checking every field against its type hint."""
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {_describe(data)}")
    _check_keys(data, cls, path)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        where = _join(path, f.name)
        if f.name in data:
            values[f.name] = _convert(data[f.name], hints[f.name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{where}: required key is missing")
    try:
        return cls(**values)
    except RecipeError:
        raise
    except ValueError as error:   # a section's own checks (__post_init__); "field: reason" names the key
        field_name, _, reason = str(error).partition(": ")
        known = {f.name for f in dataclasses.fields(cls)}
        raise RecipeError(f"{_join(path, field_name)}: {reason}" if field_name in known and reason
                          else f"{path}: {error}") from None


def _convert(value: Any, hint: Any, path: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, path)
            except RecipeError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        expected = " or ".join(_type_name(a) for a in args)
        raise RecipeError(f"{path}: expected {expected}, got {_describe(value)}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{path}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {_describe(value)}")
        return [_convert(item, args[0], _join(path, i)) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    return _scalar(value, hint, path)


def _scalar(value: Any, hint: Any, path: str):
    if hint is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {_describe(value)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        # YAML reads "2e-3" (no dot) as a string; accept it as the number a person meant.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"recipe field {path} has an unsupported type hint {hint!r}")


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint) or hint is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 40 else text[:37] + '...'}"


# ---- cross-field rules ----------------------------------------------------------------------------------


def validate(recipe: Recipe) -> None:
    """Rules no single field can check; each error names the key to change."""
    if not recipe.stages:
        raise RecipeError("stages: a recipe needs at least one stage")
    if isinstance(recipe.model, str) and not recipe.model.strip():
        raise RecipeError("model: empty model name")
    for name in recipe.report_to:
        if name not in REPORTERS:
            raise RecipeError(f"report_to: {name!r} is not one of {', '.join(REPORTERS)}")
    names = [stage.name for stage in recipe.stages]
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}]"
        if not stage.name or "/" in stage.name or stage.name in names[:index]:
            raise RecipeError(f"{where}.name: stage names must be unique, non-empty and contain no '/'")
        _validate_data(stage.data, f"{where}.data")
        if stage.eval_data is not None:
            _validate_data(stage.eval_data, f"{where}.eval_data")
        if stage.router is not None:
            _validate_router_stage(stage, where)
            continue
        if stage.moe is not None:
            _, router = moe_settings(stage, where)
            if router.startswith("stage:"):
                _check_router_stage_name(recipe, index, router.removeprefix("stage:"), f"{where}.moe.router")
        _validate_parts(stage, where)
        _validate_moe_parts(recipe, index, where)
        _validate_loop(stage, where)


def _validate_data(data: DataSpec, where: str) -> None:
    if (data.path is None) == (data.mixture is None):
        raise RecipeError(f"{where}: give exactly one of path (a data file) or mixture")
    if data.mixture is not None and data.format != "canonical":
        raise RecipeError(f"{where}.format: a mixture names its own formats; remove format")
    if data.limit is not None and data.limit < 1:
        raise RecipeError(f"{where}.limit: must be at least 1")


def moe_settings(stage: Stage, where: str = "") -> tuple[MoESettings, str]:
    """(settings, router source) of a stage's ``moe`` section: its preset with the section's keys on top."""
    raw = dict(stage.moe or {})
    prefix = f"{where}." if where else ""
    preset, router = raw.pop("preset", "default"), raw.pop("router", "random")
    if not isinstance(router, str) or not router:
        raise RecipeError(f"{prefix}moe.router: expected random, a router file or stage:NAME, got {router!r}")
    known = [f.name for f in dataclasses.fields(MoESettings)]
    hints = typing.get_type_hints(MoESettings)
    values = {}
    for key, value in raw.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known + ["preset", "router"], n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: preset, router, {', '.join(known)})"
            raise RecipeError(f"{prefix}moe.{key}: unknown key{hint}")
        values[key] = _convert(value, hints[key], f"{prefix}moe.{key}")
    try:
        return MoESettings.preset(str(preset), **values), router
    except ValueError as error:   # the message starts with the key ("moe.num_experts: ...")
        raise RecipeError(f"{prefix}{error}") from None


def _check_router_stage_name(recipe: Recipe, index: int, name: str, where: str) -> None:
    earlier = {s.name: s for s in recipe.stages[:index]}
    if name not in earlier or earlier[name].router is None:
        routers = [s.name for s in recipe.stages[:index] if s.router is not None]
        raise RecipeError(f"{where}: no router stage {name!r} before this stage "
                          f"(router stages before it: {', '.join(routers) or 'none'})")


def _validate_router_stage(stage: Stage, where: str) -> None:
    for key in ("moe", "lora"):
        if getattr(stage, key) is not None:
            raise RecipeError(f"{where}.{key}: a router stage trains only the router; remove {key}")
    if any(getattr(stage.lr, part) for part in PARTS):
        raise RecipeError(f"{where}.lr: a router stage trains no part of the model (its own rate is router.lr); "
                          "remove lr")
    if stage.packing:
        raise RecipeError(f"{where}.packing: a router stage reads one sample at a time; remove packing")


def _validate_moe_parts(recipe: Recipe, index: int, where: str) -> None:
    """Experts, router and dense-FFN rates need a model with experts: this stage or an earlier one makes them."""
    stage = recipe.stages[index]
    asked = [part for part in MOE_PARTS if getattr(stage.lr, part) > 0]
    made = any(s.moe is not None for s in recipe.stages[:index + 1])
    if asked and not made and isinstance(recipe.model, dict):
        raise RecipeError(f"{where}.lr.{asked[0]}: the model has no experts yet; add a moe section to this "
                          "stage (or an earlier one) to make them")
    if stage.lora is not None and stage.lora.on_experts and not made and isinstance(recipe.model, dict):
        raise RecipeError(f"{where}.lora.on_experts: the model has no experts; add a moe section")


def _validate_parts(stage: Stage, where: str) -> None:
    lr = stage.lr
    for part in PARTS:
        if getattr(lr, part) < 0:
            raise RecipeError(f"{where}.lr.{part}: a learning rate cannot be negative (0 freezes the part)")
    trained = [part for part in PARTS if part != "lora" and getattr(lr, part) > 0]
    if stage.lora is None:
        if lr.lora > 0:
            raise RecipeError(f"{where}.lr.lora: set to {lr.lora} but the stage has no lora section")
        if not trained:
            raise RecipeError(f"{where}.lr: every part is frozen ({', '.join(p for p in PARTS if p != 'lora')} "
                              "are 0); give at least one part a learning rate")
        return
    lora = stage.lora
    if lr.lora <= 0:
        raise RecipeError(f"{where}.lr.lora: the stage has a lora section, so lr.lora must be > 0")
    if lr.llm > 0:
        raise RecipeError(f"{where}.lr.llm: full fine-tuning of the LLM cannot be combined with LoRA on it; "
                          "set lr.llm to 0 or remove the lora section")
    if lora.on_vision and lr.vision > 0:
        raise RecipeError(f"{where}.lr.vision: the vision tower gets LoRA (lora.on_vision), so lr.vision must "
                          "be 0")
    if lora.r < 1 or lora.alpha < 1:
        raise RecipeError(f"{where}.lora.r: r and alpha must be at least 1")
    if not 0 <= lora.dropout < 1:
        raise RecipeError(f"{where}.lora.dropout: must be in [0, 1)")
    if not lora.target_modules:
        raise RecipeError(f"{where}.lora.target_modules: name at least one layer")
    whole_moe = [part for part in MOE_PARTS if getattr(lr, part) > 0 and not (part == "experts" and lora.on_experts)]
    if whole_moe:
        raise RecipeError(f"{where}.lr.{whole_moe[0]}: a LoRA stage trains the projector and vision tower whole "
                          "beside the adapters, not the MoE parts; use lora.on_experts for the experts, or a stage "
                          "without lora")
    if lora.on_experts and lora.dropout:
        raise RecipeError(f"{where}.lora.dropout: LoRA on fused expert weights (on_experts) has no dropout "
                          "(PEFT's target_parameters); set dropout to 0")
    if lora.on_experts and lr.experts > 0:
        raise RecipeError(f"{where}.lr.experts: the experts get LoRA (lora.on_experts), so lr.experts must be 0")


def _validate_loop(stage: Stage, where: str) -> None:
    if stage.packing and stage.group_by_length:
        raise RecipeError(f"{where}.group_by_length: cannot be combined with packing (packed rows already have "
                          "equal length); choose one")
    if stage.max_steps is None and stage.epochs <= 0:
        raise RecipeError(f"{where}.epochs: must be > 0 (or set max_steps)")
    if stage.max_steps is not None and stage.max_steps < 1:
        raise RecipeError(f"{where}.max_steps: must be at least 1")
    for name in ("batch_size", "grad_accum", "max_length", "save_steps", "log_steps", "keep_last_k"):
        if getattr(stage, name) < 1:
            raise RecipeError(f"{where}.{name}: must be at least 1")
    if stage.eval_steps is not None and (stage.eval_steps < 1 or stage.eval_data is None):
        raise RecipeError(f"{where}.eval_steps: needs eval_data and a value of at least 1")
    if not 0 <= stage.warmup_ratio < 1:
        raise RecipeError(f"{where}.warmup_ratio: must be in [0, 1)")
    if stage.template is not None:
        from medtune.models.templates import TEMPLATE_NAMES   # plain Python, no torch

        if stage.template not in TEMPLATE_NAMES:
            close = difflib.get_close_matches(stage.template, TEMPLATE_NAMES, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(TEMPLATE_NAMES)}"
            raise RecipeError(f"{where}.template: unknown chat template {stage.template!r} ({hint})")
    if stage.max_length < 16:
        raise RecipeError(f"{where}.max_length: {stage.max_length} tokens cannot hold a prompt and an answer")


def check_environment(recipe: Recipe, *, device: str | None = None) -> None:
    """Checks that need the machine (bf16 support, CUDA for QLoRA, DeepSpeed installed): still before work."""
    import importlib.util

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(recipe.model, dict):
        _check_model_spec(recipe.model)
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}]"
        if stage.precision == "bf16" and not bf16_supported(device):
            raise RecipeError(f"{where}.precision: bf16 is not supported on this {device}; use fp32")
        if stage.lora is not None and stage.lora.quantize is not None:
            if device != "cuda":
                raise RecipeError(f"{where}.lora.quantize: QLoRA needs a CUDA GPU (bitsandbytes kernels); "
                                  "remove quantize to train plain LoRA on this machine")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise RecipeError(f"{where}.lora.quantize: QLoRA needs bitsandbytes (pip install bitsandbytes)")
    strategy = recipe.distributed.strategy
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if strategy != "ddp" and several_processes and device != "cuda":
        # accelerate 1.15 (state.py, AcceleratorState) turns FSDP and DeepSpeed on only for multi-accelerator
        # process groups; on CPU (gloo) Trainer would silently fall back to DDP.
        raise RecipeError(f"distributed.strategy: {strategy} needs GPUs (Accelerate enables FSDP/DeepSpeed only "
                          "on accelerators); use ddp for multi-process CPU training")
    if strategy.startswith("zero") or recipe.distributed.deepspeed_config:
        if importlib.util.find_spec("deepspeed") is None:
            raise RecipeError(f"distributed.strategy: {strategy} needs DeepSpeed, an optional extra: "
                              "pip install 'medtune[deepspeed]'")
    for name in recipe.report_to:
        if name in ("wandb", "mlflow") and importlib.util.find_spec(name) is None:
            raise RecipeError(f"report_to: {name} is not installed (pip install {name})")


def _check_model_spec(model: dict) -> None:
    """Keys of a composed-model mapping are ModelSpec fields (plus ``preset``); checked by name here."""
    from dataclasses import fields

    from medtune.models.build import ModelSpec
    from medtune.models.presets import MODEL_PRESETS, PRESET_NAMES

    if model.get("preset") in MODEL_PRESETS:
        return   # a preset that builds a model of its own kind: its settings are the builder's arguments
    known = [f.name for f in fields(ModelSpec)] + ["preset"]
    for key in model:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise RecipeError(f"model.{key}: unknown key" + (f" (did you mean {close[0]}?)" if close else ""))
    if "preset" in model and model["preset"] not in PRESET_NAMES:
        raise RecipeError(f"model.preset: {model['preset']!r} is not one of {', '.join(PRESET_NAMES)}")
    if "preset" not in model and not {"vision", "llm"} <= set(model):
        raise RecipeError("model: a composed model needs vision and llm (or a preset)")


def bf16_supported(device: str) -> bool:
    import torch

    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    from transformers.utils import is_torch_bf16_available_on_device

    return is_torch_bf16_available_on_device("cpu")


# ---- overrides and the tiny swap ------------------------------------------------------------------------


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.0.c=value`` overrides (values parsed as YAML; ``*`` addresses every list item)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r}: expected key=value, e.g. stages.0.max_steps=3")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _set_path(raw, key.strip().split("."), value, item)
    return raw


def _set_path(node: Any, keys: list[str], value: Any, item: str) -> None:
    head, rest = keys[0], keys[1:]
    if isinstance(node, list):
        indices = range(len(node)) if head == "*" else [_index(head, node, item)]
        for index in indices:
            if rest:
                _set_path(node[index], rest, value, item)
            else:
                node[index] = value
        return
    if not isinstance(node, dict):
        raise RecipeError(f"override {item!r}: {head!r} is inside a value that is not a mapping or a list")
    if not rest:
        node[head] = value
        return
    if node.get(head) is None:
        node[head] = {}
    _set_path(node[head], rest, value, item)


def _index(head: str, node: list, item: str) -> int:
    if not head.lstrip("-").isdigit() or not -len(node) <= int(head) < len(node):
        raise RecipeError(f"override {item!r}: {head!r} is not an index of a list of {len(node)} items")
    return int(head)


TINY_STEPS = 2
TINY_SAMPLES = 16


def make_tiny(raw: dict) -> dict:
    """The same recipe on the tiny preset model, bundled VQA-RAD and two steps per stage (CPU seconds).

    What a stage trains (its learning rates, LoRA, template, packing) is kept, because that is what a tiny
    run should exercise; the model keeps its template and projector kind when the recipe composes one.
    """
    raw = copy.deepcopy(raw)
    model = raw.get("model")
    tiny_model = {"preset": raw.get("tiny_preset", "tiny")}
    if isinstance(model, dict) and tiny_model["preset"] == "tiny":
        tiny_model.update({k: model[k] for k in ("template", "projector") if k in model})
    raw["model"] = tiny_model
    raw.setdefault("output_dir", "runs/tiny")
    strategy = (raw.get("distributed") or {}).get("strategy", "ddp")
    # DeepSpeed is an optional extra; the tiny run checks the recipe's stages, not the engine.
    raw["distributed"] = {"strategy": "ddp" if str(strategy).startswith("zero") else strategy}
    tiny_data = {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad", "limit": TINY_SAMPLES}
    defaults = raw.pop("defaults", None) or {}
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    for index, stage in enumerate(stages):
        if not isinstance(stage, dict):
            continue
        stage = stages[index] = _deep_merge(defaults, stage) if isinstance(defaults, dict) else stage
        # how labels are made is part of what the stage trains: it stays (first_separator: the bundled data's
        # prompts end with the template's end-of-turn token too)
        labels = (stage.get("data") or {}).get("labels") if isinstance(stage.get("data"), dict) else None
        stage.update(data={**tiny_data, **({"labels": labels} if labels else {})}, max_steps=TINY_STEPS,
                     batch_size=2, grad_accum=1, max_length=256,
                     precision="fp32", save_steps=TINY_STEPS, log_steps=1, dataloader_workers=0)
        stage.pop("eval_data", None)
        stage.pop("eval_steps", None)
        if isinstance(stage.get("lora"), dict):
            stage["lora"] = {**stage["lora"], "r": 4, "alpha": 8, "quantize": None}
        if isinstance(stage.get("router"), dict):   # VQA-RAD labels organs (HEAD, CHEST, ABD), not modalities
            router = stage["router"]
            experts = router.get("num_experts") or len(router.get("classes") or []) or None
            stage["router"] = {**router, "label": "organ", "classes": [], "epochs": 5, "num_experts": experts}
        if isinstance(stage.get("moe"), dict) and not str(stage["moe"].get("router", "random")).startswith(
                ("random", "stage:")):
            stage["moe"] = {**stage["moe"], "router": "random"}   # a router file of the real run is not here
    return raw


def resolve_data_path(path: str) -> Path:
    """A data path as written in a recipe; ``bundled:vqa_rad/trainset.json`` names the bundled data."""
    if path.startswith("bundled:"):
        from medtune.paths import bundled_data

        return bundled_data(*path.removeprefix("bundled:").split("/"))
    return Path(path).expanduser()
