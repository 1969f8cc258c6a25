"""Training recipes: a model and a list of stages, read from YAML and checked before any work starts.

A recipe is configuration, not code (DESIGN principle 5). Stages differ in their data, in which parts of the
model train and at which learning rate (0 = frozen), and in the usual loop settings; stage n+1 starts from
stage n's output.

Design choices:

* Every section is a dataclass with one comment per field; :func:`parse_recipe` has pydantic check the YAML
  against those type hints (:mod:`medtune.validation`: strict scalars, unknown keys refused), so an unknown
  key, a wrong type or an impossible combination fails with the key's path, e.g.
  ``stages[1].lr.projectr: unknown key (did you mean projector?)``. Each stage is checked on its own and the
  cross-field rules run on every section that was readable, so one :class:`RecipeError` lists every problem of
  the recipe (one line each, key path first; ``error.problems`` holds them). Nothing heavy is imported here, so
  a bad recipe fails in milliseconds.
* The model's attention implementation is a model setting (``model: {preset: small, attn_implementation:
  sdpa}``, or ``{checkpoint: PATH, attn_implementation: flash_attention_2}`` for a checkpoint) and a stage's
  ``packing`` names how packed samples are kept apart (``position_ids`` / ``mask`` / ``flatten``, or ``true`` for
  the default of the attention implementation; :mod:`medtune.models.packing`); pairs that cannot be exact are
  refused here, naming both keys.
* A recipe may have a ``defaults`` mapping merged under every stage, so that recipes list only what changes
  from stage to stage.
* ``key=value`` overrides address the raw YAML by dotted path (``stages.0.max_steps=3``, ``stages.*.lr.llm=0``)
  and are applied before validation, so an override is checked exactly like the file. ``tiny=true`` swaps in
  the tiny preset model, the bundled VQA-RAD data and two steps per stage (:func:`make_tiny`), so every shipped
  recipe can be exercised on a CPU in seconds.
"""
from __future__ import annotations

import copy
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from medtune.distributed import launched_distributed
from medtune.errors import RecipeError, suggestion
from medtune.train.objectives import METHODS, method_of, objective_for
from medtune.train.objectives.dpo import DPOSettings
from medtune.train.objectives.orpo import ORPOSettings
from medtune.train.objectives.simpo import SimPOSettings
from medtune.train.router import RouterTraining
from medtune.train.objectives.grpo import GRPOSettings
from medtune.models.moe.settings import MoESettings   # plain Python, no torch
from medtune.validation import (INVALID, Bool, Int, Mapping, Number, Str, describe, keys, section, strict,
                                unknown_keys, validate)


@section
@dataclass
class DataSpec:
    """Where a stage's samples come from: one file in a known format, or a mixture of datasets."""

    path: Str | None = None            # a data file (canonical .jsonl, or any format medtune reads)
    format: Str | None = None          # a name from medtune.data.formats.FORMATS; None: detected from the content
    image_root: Str | None = None      # root of relative image paths; default: the data file's directory
    mixture: Str | None = None         # a `medtune mix` YAML or a GMAI-VL list JSON, instead of `path`
    limit: Int | None = None           # use only the first N samples (smoke tests, tiny runs)
    truncation: Literal["text", "drop"] = "text"   # over-long samples: cut text only, or drop and count
    strict: Bool = False               # stop at the first bad record instead of skipping and counting it
    # Which tokens train: every reply (roles), or MedMax's rule for discrete-token models: everything after the
    # first end-of-turn token (first_separator).
    labels: Literal["roles", "first_separator"] = "roles"
    # Discrete-token models: precomputed image codes (`medtune tokenize-images` output, or MedMax's Parquet);
    # images without codes there are encoded by the model's VQ.
    image_codes: Str | None = None


@section
@dataclass
class LearningRates:
    """Peak learning rate of each trainable part; 0 freezes the part."""

    vision: Number = 0.0     # the vision encoder
    projector: Number = 0.0  # the vision-to-language projector
    llm: Number = 0.0        # the language model, fully fine-tuned (embeddings and head included)
    lora: Number = 0.0       # the LoRA adapters (needs a `lora` section)
    # mixture-of-experts models only (a stage with a `moe` section, or a model made by one):
    experts: Number = 0.0    # the routed experts and the shared expert of every MoE layer
    router: Number = 0.0     # the router (gate) of every MoE layer
    ffn: Number = 0.0        # the FFNs of the layers without experts (Med-MoE trains them in stage 3)


PARTS = ("vision", "projector", "llm", "lora", "experts", "router", "ffn")
MOE_PARTS = ("experts", "router", "ffn")


@section
@dataclass
class LoraSpec:
    """LoRA adapters through PEFT on the language model (and optionally the vision encoder)."""

    r: Int = 16
    alpha: Int = 32
    dropout: Number = 0.05
    # Linear layer names inside the LLM (and vision tower, with `on_vision`) that get adapters.
    target_modules: list[Str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    on_vision: Bool = False                 # also adapt the vision tower's matching layers
    on_experts: Bool = False                # MoE models: adapters on every expert's fused weights too (rank r each)
    quantize: Literal["4bit", "8bit"] | None = None   # QLoRA: needs CUDA and bitsandbytes


@section
@dataclass
class Stage:
    """One training stage: its data, what trains, and the loop settings Trainer receives."""

    name: Str
    data: DataSpec
    lr: LearningRates = field(default_factory=LearningRates)
    lora: LoraSpec | None = None
    eval_data: DataSpec | None = None   # optional held-out data, evaluated every `eval_steps`
    epochs: Number = 1.0                # passes over the data; ignored when max_steps is set
    max_steps: Int | None = None        # optimizer steps; overrides epochs
    schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Number = 0.03
    weight_decay: Number = 0.0
    max_grad_norm: Number = 1.0
    batch_size: Int = 1                 # per device
    grad_accum: Int = 1                 # gradient accumulation steps
    max_length: Int = 2048              # tokens per sample (per packed row with packing)
    # Pack several samples per row, kept apart by: position_ids (restart per sample), mask (an explicit block
    # mask) or flatten (one row, varlen kernels); true = the attention implementation's default (flatten for
    # flash-attention, mask for sdpa, position_ids for flex_attention and eager: medtune.models.packing).
    packing: Bool | Literal["position_ids", "mask", "flatten"] = False
    # Batch samples of similar length (less padding; not with packing): each epoch's shuffled order is cut into
    # mega-batches of N batches, each sorted by length; true = 50 batches (transformers' choice). A small N keeps
    # batches of mixed kinds of samples and the loss free of a long-period swing (medtune.models.sampler).
    group_by_length: Bool | Int = False
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: Bool = False
    template: Str | None = None         # chat template for this stage; default: the recipe model's
    # Mixture of experts: the FFNs of the chosen layers become experts before this stage trains (keys of
    # medtune.models.moe.settings.MoESettings, plus `preset: default | med-moe` and `router: random | FILE |
    # stage:NAME`, the router file a router stage of this recipe wrote).
    moe: Mapping | None = None
    # What the stage optimises (medtune.train.objectives): sft (the default); dpo, simpo or orpo (preference
    # pairs); grpo (RL on the model's own sampled answers, rewarded by the evaluation's metrics); or router:
    # instead of training the model, fit a domain classifier on its hidden states and save it as the router file
    # an MoE stage loads.
    method: Str | None = None
    # The router method's settings (medtune.train.router.RouterTraining); a stage with this section and no
    # method is a router stage.
    router: RouterTraining | None = None
    # The dpo method's settings (medtune.train.objectives.dpo.DPOSettings: beta).
    dpo: DPOSettings | None = None
    # The simpo and orpo methods' settings (medtune.train.objectives.simpo / .orpo: beta, gamma; beta).
    simpo: SimPOSettings | None = None
    orpo: ORPOSettings | None = None
    # The grpo method's settings (medtune.train.objectives.grpo.GRPOSettings: group_size, beta, rewards ...).
    grpo: GRPOSettings | None = None
    save_steps: Int = 500
    eval_steps: Int | None = None
    log_steps: Int = 10
    keep_last_k: Int = 2                # complete checkpoints kept on disk
    dataloader_workers: Int | None = None   # None: chosen from the usable cores (medtune.train.machine; 0 on a CPU)
    # None: every usable core less the workers (or MEDTUNE_TORCH_THREADS); free: fewer while other processes keep
    # cores busy (faster on a shared machine, not bit-identical across runs; medtune.train.machine)
    torch_threads: Int | Literal["free"] | None = None
    compile: Bool = False               # torch.compile the model (Trainer's torch_compile; benchmarks/train_speed.py)


@section
@dataclass
class DistributedSpec:
    """How the stage is sharded when launched with torchrun / accelerate launch (1 process: ignored)."""

    # ddp: replicate; fsdp2: shard parameters, gradients and optimizer state (FSDP2 via Accelerate);
    # zero2 / zero3: DeepSpeed (optional extra `medtune[deepspeed]`).
    strategy: Literal["ddp", "fsdp2", "zero2", "zero3"] = "ddp"
    deepspeed_config: Str | None = None   # a DeepSpeed JSON of your own instead of the built-in zero2/zero3
    fsdp_config: Mapping = field(default_factory=dict)   # extra keys passed to Trainer's fsdp_config
    backend: Str | None = None           # torch.distributed backend (nccl on GPU, gloo on CPU by default)


@section
@dataclass
class Recipe:
    """A model and its training stages."""

    model: Str | Mapping                # a checkpoint path / HF VLM name, or a ModelSpec mapping to compose one
    output_dir: Str
    stages: list[Stage]
    description: Str = ""
    seed: Int = 42
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    report_to: list[Str] = field(default_factory=lambda: ["tensorboard"])   # + wandb, mlflow if installed
    cache_dir: Str | None = None        # token cache (default: $MEDTUNE_CACHE/tokens, ~/.cache/medtune/tokens)
    tiny_preset: Str = "tiny"           # the model preset the tiny override (--tiny) swaps in
    defaults: Mapping = field(default_factory=dict)   # merged under every stage (already applied once parsed)
    # eager | sdpa | flex_attention | flash_attention_2, written as model.attn_implementation; None: the model's
    # own choice (transformers picks sdpa where it can)
    attn_implementation: Str | None = field(default=None, metadata={"written_as": "model.attn_implementation"})


REPORTERS = ("tensorboard", "wandb", "mlflow", "none")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2")


def recipe_error(problems: list[str], prefix: str = "") -> RecipeError:
    """One error for every problem found: a single line for one, a count and one indented line each for more."""
    lead = f"{prefix}: " if prefix else ""
    if len(problems) == 1:
        error = RecipeError(f"{lead}{problems[0]}")
    else:
        error = RecipeError(f"{lead}{len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems))
    error.problems = list(problems)
    return error


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
        raise recipe_error(getattr(error, "problems", [str(error)]), str(path)) from None


def _pop_tiny(overrides: list[str]) -> bool:
    """``tiny=true`` is not a recipe key but a switch; remove it from the overrides and report it."""
    for item in list(overrides):
        key, _, value = item.partition("=")
        if key.strip() == "tiny":
            overrides.remove(item)
            return bool(yaml.safe_load(value)) if value else True
    return False


def parse_recipe(raw: dict) -> Recipe:
    """Validate a raw recipe mapping into a :class:`Recipe` (types, unknown keys, then cross-field rules); every
    problem found is reported in one :class:`RecipeError`."""
    problems: list[str] = []
    raw = copy.deepcopy(raw)
    attn_implementation = _take_model_settings(raw, problems)
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append("defaults: must be a mapping of stage settings")
        defaults = {}
    stages_raw = raw.get("stages")
    stages = None
    if isinstance(stages_raw, list):
        if defaults:
            problems += unknown_keys(defaults, keys(Stage), "defaults")
            # an unknown default is reported once, as defaults.KEY, not again in every stage it merges into
            defaults = {key: value for key, value in defaults.items() if key in keys(Stage)}
        stages = []
        for index, stage in enumerate(stages_raw):   # one by one, so that a bad stage leaves the others checkable
            stage, found = validate(Stage, _deep_merge(defaults, stage) if isinstance(stage, dict) else stage,
                                    f"stages[{index}]")
            stages.append(stage)
            problems += found
        raw["stages"] = []
    recipe, found = validate(Recipe, raw)
    problems += found
    if recipe is INVALID:   # the rules still run on what was readable
        recipe = Recipe.__new__(Recipe)
        reporters = raw.get("report_to", [])
        recipe.model = raw.get("model")
        recipe.report_to = reporters if isinstance(reporters, list) and all(isinstance(r, str) for r in reporters) \
            else []
    if stages is not None:
        recipe.stages = stages
    recipe.attn_implementation = attn_implementation
    validate_rules(recipe, problems)
    if problems:
        raise recipe_error(problems)
    return recipe


def _take_model_settings(raw: dict, problems: list[str]) -> str | None:
    """Take ``model.attn_implementation`` out of the model mapping (and ``model.checkpoint``: the mapping form of
    a checkpoint name), leaving ``raw["model"]`` what builds or loads the model; the attention implementation."""
    if "attn_implementation" in raw:
        problems.append("attn_implementation: a model setting; write it as model.attn_implementation")
        raw.pop("attn_implementation")
    model = raw.get("model")
    if not isinstance(model, dict):
        return None
    model = dict(model)
    implementation = model.pop("attn_implementation", None)
    if implementation is not None and implementation not in ATTENTION_IMPLEMENTATIONS:
        hint = suggestion(implementation, ATTENTION_IMPLEMENTATIONS, list_known=False)
        hint = f" ({hint})" if hint else ""
        problems.append(f"model.attn_implementation: {implementation!r} is not one of "
                        f"{', '.join(ATTENTION_IMPLEMENTATIONS)}{hint}")
        implementation = None
    if "checkpoint" in model:
        for key in sorted(set(model) - {"checkpoint"}):
            problems.append(f"model.{key}: a checkpoint takes only attn_implementation beside it (the other "
                            "model keys build a model)")
        checkpoint = model["checkpoint"]
        if not isinstance(checkpoint, str):
            problems.append(f"model.checkpoint: expected a checkpoint path or hub name, got {describe(checkpoint)}")
        model = checkpoint
    raw["model"] = model
    return implementation


def _deep_merge(base: dict, top: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ---- cross-field rules ----------------------------------------------------------------------------------


def validate_rules(recipe: Recipe, problems: list[str] | None = None) -> None:
    """Rules no single field can check; each problem names the key to change. With ``problems`` they are
    appended there (sections that could not be read are skipped), else the first is raised."""
    collect = problems is not None
    problems = problems if collect else []
    stages = getattr(recipe, "stages", None)
    if stages is not None and not stages:
        problems.append("stages: a recipe needs at least one stage")
    if isinstance(recipe.model, str) and not recipe.model.strip():
        problems.append("model: empty model name")
    for name in recipe.report_to or []:
        if name not in REPORTERS:
            problems.append(f"report_to: {name!r} is not one of {', '.join(REPORTERS)}")
    stages = [stage if isinstance(stage, Stage) else None for stage in stages or []]
    names = [stage.name if stage is not None else None for stage in stages]
    for index, stage in enumerate(stages):
        if stage is not None:
            problems.extend(_stage_problems(recipe, stages, index, names))
    if problems and not collect:
        raise recipe_error(problems)


def _stage_problems(recipe: Recipe, stages: list, index: int, names: list) -> list[str]:
    stage, where = stages[index], f"stages[{index}]"
    problems = []
    if not stage.name or "/" in stage.name or stage.name in names[:index]:
        problems.append(f"{where}.name: stage names must be unique, non-empty and contain no '/'")
    problems += _data_problems(stage.data, f"{where}.data")
    if stage.eval_data is not None:
        problems += _data_problems(stage.eval_data, f"{where}.eval_data")
    try:
        objective = objective_for(stage)
    except ValueError:
        return problems + [f"{where}.method: unknown method {stage.method!r} ({suggestion(stage.method, METHODS)})"]
    problems += objective.problems(stage, where)
    if not objective.trains_with_trainer:
        return problems
    if stage.moe is not None:
        try:
            _, router = moe_settings(stage, where)
        except RecipeError as error:
            problems.append(str(error))
        else:
            if router.startswith("stage:"):
                problems += _router_stage_name_problems(stages, index, router.removeprefix("stage:"),
                                                        f"{where}.moe.router")
    problems += _parts_problems(stage, where)
    problems += _moe_parts_problems(recipe, stages, index, where)
    problems += _loop_problems(stage, where)
    problems += _packing_problems(stage, recipe.attn_implementation, where)
    return problems


def _data_problems(data: DataSpec, where: str) -> list[str]:
    problems = []
    if (data.path is None) == (data.mixture is None):
        problems.append(f"{where}: give exactly one of path (a data file) or mixture")
    if data.mixture is not None and data.format is not None:
        problems.append(f"{where}.format: a mixture names its own formats; remove format")
    if data.format is not None:
        from medtune.data.formats import FORMATS   # plain Python, no torch

        if data.format not in FORMATS:
            problems.append(f"{where}.format: unknown data format {data.format!r} "
                            f"({suggestion(data.format, FORMATS)})")
    if data.limit is not None and data.limit < 1:
        problems.append(f"{where}.limit: must be at least 1")
    return problems


def moe_settings(stage: Stage, where: str = "") -> tuple[MoESettings, str]:
    """(settings, router source) of a stage's ``moe`` section: its preset with the section's keys on top."""
    raw = dict(stage.moe or {})
    prefix = f"{where}." if where else ""
    preset, router = raw.pop("preset", "default"), raw.pop("router", "random")
    if not isinstance(router, str) or not router:
        raise RecipeError(f"{prefix}moe.router: expected random, a router file or stage:NAME, got {router!r}")
    hints = typing.get_type_hints(MoESettings, include_extras=True)
    problems = unknown_keys(raw, ["preset", "router", *hints], f"{prefix}moe")
    values = {}
    for key, value in raw.items():
        if key in hints:
            values[key], found = validate(strict(hints[key]), value, f"{prefix}moe.{key}")
            problems += found
    if problems:
        raise RecipeError(problems[0])
    try:
        return MoESettings.preset(str(preset), **values), router
    except ValueError as error:   # the message starts with the key ("moe.num_experts: ...")
        raise RecipeError(f"{prefix}{error}") from None


def _router_stage_name_problems(stages: list, index: int, name: str, where: str) -> list[str]:
    earlier = {s.name: s for s in stages[:index] if s is not None}
    if name in earlier and method_of(earlier[name]) == "router":
        return []
    routers = [s.name for s in stages[:index] if s is not None and method_of(s) == "router"]
    return [f"{where}: no router stage {name!r} before this stage "
            f"(router stages before it: {', '.join(routers) or 'none'})"]


def _moe_parts_problems(recipe: Recipe, stages: list, index: int, where: str) -> list[str]:
    """Experts, router and dense-FFN rates need a model with experts: this stage or an earlier one makes them."""
    stage = stages[index]
    asked = [part for part in MOE_PARTS if getattr(stage.lr, part) > 0]
    made = any(s is not None and s.moe is not None for s in stages[:index + 1])
    problems = []
    if asked and not made and isinstance(recipe.model, dict):
        problems.append(f"{where}.lr.{asked[0]}: the model has no experts yet; add a moe section to this "
                        "stage (or an earlier one) to make them")
    if stage.lora is not None and stage.lora.on_experts and not made and isinstance(recipe.model, dict):
        problems.append(f"{where}.lora.on_experts: the model has no experts; add a moe section")
    return problems


def _parts_problems(stage: Stage, where: str) -> list[str]:
    lr = stage.lr
    problems = [f"{where}.lr.{part}: a learning rate cannot be negative (0 freezes the part)"
                for part in PARTS if getattr(lr, part) < 0]
    trained = [part for part in PARTS if part != "lora" and getattr(lr, part) > 0]
    if stage.lora is None:
        if lr.lora > 0:
            problems.append(f"{where}.lr.lora: set to {lr.lora} but the stage has no lora section")
        elif not trained and not problems:
            problems.append(f"{where}.lr: every part is frozen ({', '.join(p for p in PARTS if p != 'lora')} "
                            "are 0); give at least one part a learning rate")
        return problems
    lora = stage.lora
    if lr.lora <= 0:
        problems.append(f"{where}.lr.lora: the stage has a lora section, so lr.lora must be > 0")
    if lr.llm > 0:
        problems.append(f"{where}.lr.llm: full fine-tuning of the LLM cannot be combined with LoRA on it; "
                        "set lr.llm to 0 or remove the lora section")
    if lora.on_vision and lr.vision > 0:
        problems.append(f"{where}.lr.vision: the vision tower gets LoRA (lora.on_vision), so lr.vision must be 0")
    if lora.r < 1 or lora.alpha < 1:
        problems.append(f"{where}.lora.r: r and alpha must be at least 1")
    if not 0 <= lora.dropout < 1:
        problems.append(f"{where}.lora.dropout: must be in [0, 1)")
    if not lora.target_modules:
        problems.append(f"{where}.lora.target_modules: name at least one layer")
    whole_moe = [part for part in MOE_PARTS if getattr(lr, part) > 0 and not (part == "experts" and lora.on_experts)]
    if whole_moe:
        problems.append(f"{where}.lr.{whole_moe[0]}: a LoRA stage trains the projector and vision tower whole "
                        "beside the adapters, not the MoE parts; use lora.on_experts for the experts, or a stage "
                        "without lora")
    if lora.on_experts and lora.dropout:
        problems.append(f"{where}.lora.dropout: LoRA on fused expert weights (on_experts) has no dropout "
                        "(PEFT's target_parameters); set dropout to 0")
    if lora.on_experts and lr.experts > 0:
        problems.append(f"{where}.lr.experts: the experts get LoRA (lora.on_experts), so lr.experts must be 0")
    return problems


def _loop_problems(stage: Stage, where: str) -> list[str]:
    problems = []
    if stage.packing and stage.group_by_length:
        problems.append(f"{where}.group_by_length: cannot be combined with packing (packed rows already have "
                        "equal length); choose one")
    if not isinstance(stage.group_by_length, bool) and stage.group_by_length < 1:
        problems.append(f"{where}.group_by_length: {stage.group_by_length} batches per mega-batch; give at "
                        "least 1, true (50) or false")
    if stage.max_steps is None and stage.epochs <= 0:
        problems.append(f"{where}.epochs: must be > 0 (or set max_steps)")
    if stage.max_steps is not None and stage.max_steps < 1:
        problems.append(f"{where}.max_steps: must be at least 1")
    problems += [f"{where}.{name}: must be at least 1" for name in
                 ("batch_size", "grad_accum", "max_length", "save_steps", "log_steps", "keep_last_k")
                 if getattr(stage, name) < 1]
    if stage.eval_steps is not None and (stage.eval_steps < 1 or stage.eval_data is None):
        problems.append(f"{where}.eval_steps: needs eval_data and a value of at least 1")
    if not 0 <= stage.warmup_ratio < 1:
        problems.append(f"{where}.warmup_ratio: must be in [0, 1)")
    if stage.template is not None:
        from medtune.models.templates import TEMPLATE_NAMES   # plain Python, no torch

        if stage.template not in TEMPLATE_NAMES:
            problems.append(f"{where}.template: unknown chat template {stage.template!r} "
                            f"({suggestion(stage.template, TEMPLATE_NAMES)})")
    if 1 <= stage.max_length < 16:
        problems.append(f"{where}.max_length: {stage.max_length} tokens cannot hold a prompt and an answer")
    return problems


def _packing_problems(stage: Stage, attn_implementation: str | None, where: str) -> list[str]:
    """A packing mode the recipe's attention implementation cannot run exactly (both keys named)."""
    from medtune.models.packing import pair_refusal   # plain Python, no torch

    if not isinstance(stage.packing, str) or attn_implementation is None:
        return []
    reason = pair_refusal(stage.packing, attn_implementation)
    if reason is None:
        return []
    return [f"{where}.packing: {stage.packing!r} with model.attn_implementation {attn_implementation!r}: {reason}"]


def check_environment(recipe: Recipe, *, device: str | None = None) -> None:
    """Checks that need the machine (bf16 support, CUDA for QLoRA and flash-attention, DeepSpeed installed):
    still before work, every problem at once."""
    import importlib.util

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    problems = _model_spec_problems(recipe.model) if isinstance(recipe.model, dict) else []
    problems += _attention_problems(recipe.attn_implementation, device)
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}]"
        if stage.precision == "bf16" and not bf16_supported(device):
            problems.append(f"{where}.precision: bf16 is not supported on this {device}; use fp32")
        if stage.lora is not None and stage.lora.quantize is not None:
            if device != "cuda":
                problems.append(f"{where}.lora.quantize: QLoRA needs a CUDA GPU (bitsandbytes kernels); remove "
                                "quantize to train plain LoRA on this machine")
            elif importlib.util.find_spec("bitsandbytes") is None:
                problems.append(f"{where}.lora.quantize: QLoRA needs bitsandbytes (pip install bitsandbytes)")
    strategy = recipe.distributed.strategy
    if strategy != "ddp" and launched_distributed() and device != "cuda":
        # accelerate 1.15 (state.py, _prepare_backend) turns FSDP and DeepSpeed on only for launched processes on
        # accelerators (one GPU is enough); on CPU (gloo) Trainer would silently fall back to DDP.
        problems.append(f"distributed.strategy: {strategy} needs GPUs (Accelerate enables FSDP/DeepSpeed only on "
                        "accelerators); use ddp for multi-process CPU training")
    if strategy.startswith("zero") or recipe.distributed.deepspeed_config:
        if importlib.util.find_spec("deepspeed") is None:
            problems.append(f"distributed.strategy: {strategy} needs DeepSpeed, an optional extra: "
                            "pip install 'medtune[deepspeed]'")
    for name in recipe.report_to:
        if name in ("wandb", "mlflow") and importlib.util.find_spec(name) is None:
            problems.append(f"report_to: {name} is not installed (pip install {name})")
    if problems:
        raise recipe_error(problems)


def _attention_problems(implementation: str | None, device: str) -> list[str]:
    """An attention implementation this machine cannot run."""
    import importlib.util

    if implementation == "flash_attention_2":
        if device != "cuda":
            return ["model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa (or flex_attention) "
                    "on this machine"]
        if importlib.util.find_spec("flash_attn") is None:
            return ["model.attn_implementation: flash_attention_2 needs the flash-attn package "
                    "(pip install flash-attn); use sdpa, or kernels-community/flash-attn via the kernels package"]
    if implementation == "flex_attention" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return ["model.attn_implementation: flex_attention needs torch >= 2.5 (torch.nn.attention.flex_attention)"]
    return []


def _model_spec_problems(model: dict) -> list[str]:
    """Keys of a composed-model mapping are ModelSpec fields (plus ``preset``); checked by name here."""
    from dataclasses import fields

    from medtune.models.build import ModelSpec
    from medtune.models.presets import MODEL_PRESETS, PRESET_NAMES

    if model.get("preset") in MODEL_PRESETS:
        return []   # a preset that builds a model of its own kind: its settings are the builder's arguments
    problems = unknown_keys(model, [f.name for f in fields(ModelSpec)] + ["preset"], "model", list_known=False)
    if "preset" in model and model["preset"] not in PRESET_NAMES:
        problems.append(f"model.preset: {model['preset']!r} is not one of {', '.join(PRESET_NAMES)}")
    if "preset" not in model and not {"vision", "llm"} <= set(model):
        problems.append("model: a composed model needs vision and llm (or a preset)")
    return problems


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
PAIR_METHODS = ("dpo", "simpo", "orpo")   # the methods that read preference pairs
TINY_SAMPLES = 16


def tiny_preferences() -> dict:
    """A preference stage's tiny data: 32 bundled preference pairs (data/vqa_rad/ATTRIBUTION.md says how they were made)."""
    from medtune.paths import bundled_data

    return {"path": "bundled:vqa_rad/tiny-preferences.jsonl", "format": "canonical", "limit": TINY_SAMPLES,
            "image_root": str(bundled_data("vqa_rad", "images"))}


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
    if isinstance(model, dict) and "attn_implementation" in model:   # how attention runs is kept, like packing
        tiny_model["attn_implementation"] = model["attn_implementation"]
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
        data = tiny_preferences() if stage.get("method") in PAIR_METHODS else tiny_data   # these read pairs
        stage.update(data={**data, **({"labels": labels} if labels else {})}, max_steps=TINY_STEPS,
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
