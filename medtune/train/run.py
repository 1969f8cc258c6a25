"""Trainer glue: run a recipe's stages with Hugging Face Trainer, one stage after another.

Trainer + Accelerate carry the loop, schedules, mixed precision, logging and the distributed engines; this
module decides what they are given:

* the model of each stage (stage 0: built from the recipe's ModelSpec or loaded; stage n: stage n-1's output),
  with its trainable parts and per-part learning-rate groups (:mod:`medtune.train.parts`);
* the data and collator (:mod:`medtune.train.data`);
* TrainingArguments translated from the stage (schedule, precision, accumulation, DDP/FSDP2/DeepSpeed);
* checkpoints with a completion marker and rotation among complete ones (:mod:`medtune.train.checkpoints`);
* what the user sees (:mod:`medtune.train.progress`): a progress bar, metrics.jsonl, TensorBoard, a summary.

What a stage optimises is its objective's (:mod:`medtune.train.objectives`, chosen by the stage's ``method``):
its settings' checks, the rows and collator, the loss, the report, and whether it writes a model. A method with
a loop of its own (the ``router`` stage) gets the stage's model and folder and runs instead of Trainer.

Layout of a run::

    OUTPUT/stage-0-align/checkpoint-N/   Trainer checkpoints (+ medtune-complete.json), last K kept
    OUTPUT/stage-0-align/model/          the stage's result, a plain checkpoint (LoRA merged) stage 1 starts from
    OUTPUT/stage-0-align/adapter/        the LoRA adapters (LoRA stages only)
    OUTPUT/stage-0-align/metrics.jsonl   one line per logging step; summary.json at the end
    OUTPUT/stage-2-router/router.*       a router stage's router file and report (no model/: the next stage
                                         starts from the last stage that wrote one)
    OUTPUT/stage-3-moe/routing.*         MoE stages: expert usage per domain (the kind's stage report)
    OUTPUT/summary.json                  all stages

A stage with a ``moe`` section first gives the model experts (``vlm.with_experts``: the FFNs of the chosen
layers upcycled, the router from a file, a router stage of the recipe, or random) and then trains as any stage.

A stage whose ``model/`` exists is finished; ``--resume`` skips it and continues an unfinished stage from its
newest complete checkpoint. Without ``--resume`` an existing stage directory is an error, never overwritten.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.data.jsonl import write_json
from medtune.models.sampler import mega_batch_factor
from medtune.train import checkpoints
from medtune.distributed import barrier, is_main_process, launched_distributed
from medtune.train.objectives import StageContext, objective_for
from medtune.train.recipe import Recipe, RecipeError, Stage, check_environment

log = logging.getLogger(__name__)

MODEL_DIR, ADAPTER_DIR, BASE_DIR = "model", "adapter", "base-model"


def stage_dir(output_dir: str | Path, index: int, stage: Stage) -> Path:
    return Path(output_dir) / f"stage-{index}-{stage.name}"


@dataclass
class StageResult:
    """What one stage did; saved as the stage's summary.json."""

    stage: str
    model_dir: str
    method: str = "sft"
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    seconds: float = 0.0
    train_loss: float | None = None
    skipped: dict = field(default_factory=dict)
    skipped_examples: dict = field(default_factory=dict)
    last_checkpoint: str | None = None
    trainable: dict = field(default_factory=dict)
    resumed_from: str | None = None
    router: dict | None = None
    already_done: bool = False

    def line(self) -> str:
        if self.already_done:
            return f"stage {self.stage}: already finished ({self.model_dir})"
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.items())
        loss = f"{self.train_loss:.4f}" if self.train_loss is not None else "-"
        return (f"stage {self.stage}: {self.steps} steps, {self.samples} samples, {self.tokens:,} tokens, "
                f"{skipped} samples skipped{f' ({reasons})' if reasons else ''}, loss {loss}, "
                f"{self.seconds:.1f}s; model: {self.model_dir}; last checkpoint: {self.last_checkpoint or '-'}")


# ---- the recipe -----------------------------------------------------------------------------------------


def run_recipe(recipe: Recipe, *, start_stage: int = 0, resume: bool = False) -> list[StageResult]:
    """Run stages ``start_stage..`` of ``recipe``; each starts from the previous stage's ``model/``."""
    if not 0 <= start_stage < len(recipe.stages):
        raise RecipeError(f"--start-stage {start_stage}: the recipe has stages 0..{len(recipe.stages) - 1}")
    check_environment(recipe)
    results = []
    for index in range(start_stage, len(recipe.stages)):
        results.append(run_stage(recipe, index, resume=resume))
        if is_main_process():
            write_json(Path(recipe.output_dir) / "summary.json",
                       {"stages": [r.__dict__ for r in results]})
    return results


def run_stage(recipe: Recipe, index: int, *, resume: bool = False) -> StageResult:
    """Train stage ``index``: its model, data, Trainer; write ``model/`` and the stage summary."""
    from medtune.train.progress import quiet_libraries

    quiet_libraries()   # one display per phase: medtune's encoding and training bars, not the libraries' own
    stage = recipe.stages[index]
    objective = objective_for(stage)
    directory = stage_dir(recipe.output_dir, index, stage)
    if objective.finished(directory):
        if not resume:
            raise RecipeError(f"stage {stage.name} already finished in {directory}; pass --resume to skip "
                              "finished stages, or choose another --output")
        return _finished(stage, directory, objective)
    if not objective.trains_with_trainer:
        return _run_own_loop(recipe, index, objective)
    resume_from = _resume_point(directory, stage, resume)
    vlm, base_path = load_stage_model(recipe, index)
    _apply_template(vlm, stage.template or home_template(recipe), stage.name)
    if stage.moe is not None:
        vlm, base_path = _with_experts(recipe, index, vlm), None   # the upcycled model is not on disk yet
    # a refused packing fails before the data is read
    collator = objective.collator(stage_collator(vlm, stage, f"stages[{index}]"), vlm)
    dataset, eval_dataset, tally = _stage_data(recipe, stage, vlm, objective)
    model = _trainable_model(vlm, stage, base_path, directory)
    objective.prepare(vlm, model, stage)
    trainer = build_trainer(recipe, stage, vlm, model, objective.rows(dataset, stage), eval_dataset, collator,
                            directory, objective=objective)
    started = time.monotonic()
    with _without_kv_cache(model, stage.gradient_checkpointing):
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    save_stage_model(trainer, vlm, stage, directory)
    result = _stage_result(stage, directory, vlm, trainer, output, dataset, tally, resume_from,
                           seconds=time.monotonic() - started, objective=objective)
    result.method = objective.name
    if is_main_process():
        objective.write_report(vlm, directory)
        write_json(directory / "summary.json", result.__dict__)
        print(objective.result_line(result), flush=True)
    return result


@contextlib.contextmanager
def _without_kv_cache(model, checkpointing: bool):
    """Train with ``use_cache`` off in every config of ``model`` when activations are checkpointed.

    Checkpointed layers cannot keep a KV cache; left on, transformers turns it off itself and says so in a
    notice that cuts into the training bar. The configs get their values back before the model is saved, so
    the stage's model generates with its cache as before.
    """
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if hasattr(c, "use_cache")}
    saved = {key: config.use_cache for key, config in configs.items()} if checkpointing else {}
    for key in saved:
        configs[key].use_cache = False
    try:
        yield
    finally:
        for key, value in saved.items():
            configs[key].use_cache = value


def _run_own_loop(recipe: Recipe, index: int, objective) -> StageResult:
    """A stage whose method runs its own loop on the current model (the router): it writes into the stage's
    folder (the main process only) and leaves the model as it was."""
    stage = recipe.stages[index]
    directory = stage_dir(recipe.output_dir, index, stage)
    vlm, model_path = load_stage_model(recipe, index)
    result = StageResult(stage=stage.name, model_dir=str(model_path or "-"), method=objective.name)

    def write_summary(folder: Path, fields: dict) -> None:
        for key, value in fields.items():
            setattr(result, key, value)
        write_json(folder / "summary.json", result.__dict__)

    if is_main_process():
        objective.fit(StageContext(recipe=recipe, index=index, directory=directory, vlm=vlm, model_path=model_path,
                                   write_summary=write_summary))
        print(objective.result_line(result), flush=True)
    barrier()
    return result


def _with_experts(recipe: Recipe, index: int, vlm):
    """The stage's model with experts: its moe settings, and the router its ``moe.router`` names."""
    from medtune.models.moe.layers import load_router
    from medtune.train.recipe import moe_settings
    from medtune.train.router import ROUTER_FILE, read_report

    stage = recipe.stages[index]
    settings, router = moe_settings(stage, f"stages[{index}]")
    router_state, domain_field = None, "modality"
    if router.startswith("stage:"):
        name = router.removeprefix("stage:")
        source = next(i for i, s in enumerate(recipe.stages) if s.name == name)
        router_dir = stage_dir(recipe.output_dir, source, recipe.stages[source])
        if not (router_dir / ROUTER_FILE).is_file():
            raise RecipeError(f"stage {stage.name}: moe.router names stage {name}, whose router is not at "
                              f"{router_dir / ROUTER_FILE}; run that stage first (--start-stage {source})")
        router, domain_field = str(router_dir / ROUTER_FILE), read_report(router_dir)["label"]
    if router != "random":
        router_state = load_router(router)
        rows = router_state["weight"].shape[0]
        if rows != settings.num_experts:
            raise RecipeError(f"stages[{index}].moe.num_experts: {settings.num_experts}, but the router {router} "
                              f"has {rows} experts")
    try:
        return vlm.with_experts(settings, router_state=router_state, domain_field=domain_field)
    except ValueError as error:
        raise RecipeError(f"stages[{index}].moe: {error}") from None

def _stage_data(recipe: Recipe, stage: Stage, vlm, objective):
    """(train dataset, eval dataset or None, tally of the training data), encoded as the objective reads them."""
    dataset, tally = objective.dataset(stage.data, vlm, max_length=stage.max_length, seed=recipe.seed,
                                       cache_dir=recipe.cache_dir, progress=is_main_process())
    eval_dataset = None
    if stage.eval_data is not None:
        eval_dataset, _ = objective.dataset(stage.eval_data, vlm, max_length=stage.max_length, seed=recipe.seed,
                                            cache_dir=recipe.cache_dir, progress=False)
    return dataset, eval_dataset, tally


def _trainable_model(vlm, stage: Stage, base_path, directory: Path):
    """The model with the stage's parts unfrozen; LoRA stages get adapters that name their base on disk."""
    from medtune.train.parts import apply_trainable_parts, load_quantized

    if stage.lora is None:
        return apply_trainable_parts(vlm, vlm.model, stage.lr)
    if base_path is None:
        base_path = _save_base(vlm, directory)
    if stage.lora.quantize is not None:
        vlm.model = load_quantized(base_path, stage.lora.quantize,
                                   gradient_checkpointing=stage.gradient_checkpointing)
    model = apply_trainable_parts(vlm, vlm.model, stage.lr, stage.lora)
    model.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    return model


def _stage_result(stage: Stage, directory: Path, vlm, trainer, output, dataset, tally, resume_from,
                  *, seconds: float, objective) -> StageResult:
    from medtune.train.parts import summarise

    _, trained = objective.count_tokens(dataset)
    return StageResult(
        stage=stage.name, model_dir=str(directory / MODEL_DIR), steps=trainer.state.global_step,
        samples=len(dataset), tokens=int(trainer.state.num_input_tokens_seen or 0), trained_tokens=trained,
        seconds=seconds, train_loss=output.metrics.get("train_loss"),
        skipped=dict(tally.skipped), skipped_examples=dict(tally.examples),
        last_checkpoint=_str(checkpoints.latest_complete_checkpoint(directory)),
        trainable=summarise(trainer.model, vlm.part_of).to_dict(), resumed_from=_str(resume_from))


def _finished(stage: Stage, directory: Path, objective) -> StageResult:
    """A finished stage's result, read back from its summary.json (or a bare one if that is missing)."""
    saved = directory / "summary.json"
    fields = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
    known = StageResult.__dataclass_fields__
    result = StageResult(**{k: v for k, v in fields.items() if k in known and k != "already_done"},
                         **({} if fields else {"stage": stage.name, "model_dir": str(directory / MODEL_DIR)}),
                         already_done=True)
    if is_main_process():
        print(objective.result_line(result), flush=True)
    return result


def _str(path) -> str | None:
    return str(path) if path is not None else None


def _resume_point(directory: Path, stage: Stage, resume: bool) -> Path | None:
    existing = checkpoints.list_checkpoints(directory)
    if not resume:
        if existing:
            raise RecipeError(f"{directory} holds checkpoints of an earlier run of stage {stage.name}; pass "
                              "--resume to continue it, or choose another --output")
        return None
    if is_main_process():
        checkpoints.discard_incomplete(directory)
    barrier()
    latest = checkpoints.latest_complete_checkpoint(directory)
    if latest is not None:
        log.info("stage %s: resuming from %s", stage.name, latest)
    return latest


def stage_collator(vlm, stage: Stage, where: str):
    """The stage's collator: padding, or packing in the stage's mode (``packing: true``: the default of the
    model's attention implementation); a mode the model cannot run exactly is refused naming the keys."""
    from medtune.models.packing import use_packing_mode

    if not stage.packing:
        return vlm.collator(packing=False, max_length=stage.max_length)
    implementation = attn_implementation(vlm.model)
    try:
        collator = vlm.collator(packing=True, max_length=stage.max_length)
        mode = use_packing_mode(collator, stage.packing, implementation)
    except ValueError as error:
        raise RecipeError(f"{where}.packing: {error} (attention: {implementation}, model.attn_implementation)") \
            from None
    log.info("stage %s: packing with %s under %s attention", stage.name, mode, implementation)
    return collator


def attn_implementation(model) -> str | None:
    """The attention implementation the model runs (its language model's, for a composite model)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", None)


# ---- models ---------------------------------------------------------------------------------------------


def load_stage_model(recipe: Recipe, index: int):
    """(VLM, path it was loaded from or None): the last earlier training stage's model, else ``recipe.model``
    (built or loaded), running the recipe's ``model.attn_implementation``."""
    vlm, path = _stage_model(recipe, index)
    if recipe.attn_implementation is not None:
        try:
            vlm.model.set_attn_implementation(recipe.attn_implementation)
        except (ValueError, ImportError) as error:
            raise RecipeError(f"model.attn_implementation: {error}") from None
    return vlm, path


def _stage_model(recipe: Recipe, index: int):
    from medtune.models.build import ModelSpec, build_vlm, load_vlm

    # the last earlier stage that wrote a model (a router stage only reads its own)
    source = next((i for i in range(index - 1, -1, -1) if objective_for(recipe.stages[i]).writes_model), None)
    if source is not None:
        previous = stage_dir(recipe.output_dir, source, recipe.stages[source]) / MODEL_DIR
        if not previous.is_dir():
            raise RecipeError(f"stage {recipe.stages[index].name} starts from stage "
                              f"{recipe.stages[source].name}'s model, which is not at {previous}; run stage "
                              f"{source} first (--start-stage {source})")
        return load_vlm(previous), previous
    if isinstance(recipe.model, str):
        return load_vlm(recipe.model), recipe.model
    settings = dict(recipe.model)
    if "preset" in settings:
        from medtune.models.presets import build_preset

        return build_preset(settings.pop("preset"), **settings), None
    return build_vlm(ModelSpec.from_dict(settings)), None


def home_template(recipe: Recipe) -> str | None:
    """The template of the recipe's model: what a stage without ``template`` trains (and serves) with.

    Not the previous stage's template: after a ``plain`` alignment stage, instruction tuning goes back to the
    model's chat format. None when it cannot be known without loading (a hub name): the loaded model's own.
    """
    if isinstance(recipe.model, dict):
        from medtune.models.build import ModelSpec
        from medtune.models.presets import MODEL_PRESETS

        if recipe.model.get("preset") in MODEL_PRESETS:
            return None   # the preset's model knows its own template
        return recipe.model.get("template", ModelSpec.__dataclass_fields__["template"].default)
    from medtune.models.kinds.base import recorded_template

    return recorded_template(recipe.model)


def _apply_template(vlm, template: str | None, stage_name: str) -> None:
    """The stage's template replaces the model's, and is stored with the tokenizer of every checkpoint."""
    if template is None or template == vlm.template:
        return
    try:
        vlm.use_template(template)
    except ValueError as error:
        raise RecipeError(f"stage {stage_name}: {error}") from None


def _save_base(vlm, directory: Path) -> Path:
    """LoRA checkpoints name their base model; a model built in memory is saved once so they can."""
    target = directory / BASE_DIR
    if is_main_process() and not target.is_dir():
        with checkpoints.atomic_directory(target) as staging:
            vlm.save(staging)
    barrier()
    return target


def save_stage_model(trainer, vlm, stage: Stage, directory: Path) -> None:
    """Write the stage's ``model/`` atomically: full weights, or (LoRA) adapters plus the merged model."""
    staging = directory / ".final.partial"
    if is_main_process() and staging.exists():   # left by a run killed while saving
        import shutil

        shutil.rmtree(staging)
    barrier()
    trainer.save_model(str(staging))
    if is_main_process():
        if stage.lora is not None:
            from medtune.train.merge import merge_checkpoint

            if (directory / ADAPTER_DIR).exists():
                import shutil

                shutil.rmtree(directory / ADAPTER_DIR)
            os.replace(staging, directory / ADAPTER_DIR)
            merge_checkpoint(directory / ADAPTER_DIR, directory / MODEL_DIR)
        else:
            os.replace(staging, directory / MODEL_DIR)
        for directory_written in (directory / MODEL_DIR, directory / ADAPTER_DIR):
            # Trainer pickles its arguments beside the weights; a model directory holds no pickles
            (directory_written / "training_args.bin").unlink(missing_ok=True)
    barrier()


# ---- Trainer --------------------------------------------------------------------------------------------


def build_trainer(recipe: Recipe, stage: Stage, vlm, model, dataset, eval_dataset, collator, directory: Path, *,
                  objective):
    from medtune.train.progress import MetricsFileCallback, ProgressBarCallback
    from medtune.train.trainer import MedtuneTrainer

    args = training_arguments(recipe, stage, directory, model)
    trainer = MedtuneTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, data_collator=collator,
        processing_class=vlm.processor or vlm.tokenizer, learning_rates=stage.lr,
        keep_last_k=stage.keep_last_k, pad_token_id=vlm.tokenizer.pad_token_id, vlm=vlm,
        objective=objective,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBarCallback())
    trainer.add_callback(MetricsFileCallback(directory / "metrics.jsonl"))
    return trainer


def training_arguments(recipe: Recipe, stage: Stage, directory: Path, model):
    from medtune.train import machine
    from medtune.train.trainer import MedtuneTrainingArguments

    # machine defaults (medtune.train.machine): workers and torch threads from the usable cores, unless set
    workers = machine.dataloader_workers(stage.dataloader_workers, cuda=_has_cuda())
    settings: dict[str, Any] = dict(
        output_dir=str(directory), seed=recipe.seed, data_seed=recipe.seed,
        per_device_train_batch_size=stage.batch_size, per_device_eval_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.grad_accum, num_train_epochs=stage.epochs,
        max_steps=stage.max_steps if stage.max_steps is not None else -1,
        lr_scheduler_type=stage.schedule, warmup_steps=stage.warmup_ratio, weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        learning_rate=max(stage.lr.vision, stage.lr.projector, stage.lr.llm, stage.lr.lora),
        bf16=stage.precision == "bf16", activation_checkpointing=stage.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if stage.gradient_checkpointing else None,
        save_strategy="steps", save_steps=stage.save_steps, save_total_limit=None,
        eval_strategy="steps" if stage.eval_steps else "no", eval_steps=stage.eval_steps,
        logging_strategy="steps", logging_steps=stage.log_steps,   # TensorBoard: OUTPUT/stage-*/runs/
        report_to=[r for r in recipe.report_to if r != "none"] or "none",
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
        # workers live for the whole stage, so each keeps the images it decoded (train.cache.ImageMemo)
        dataloader_num_workers=workers, dataloader_persistent_workers=workers > 0, disable_tqdm=True,
        torch_threads=machine.torch_threads(stage.torch_threads, workers=workers), torch_compile=stage.compile,
        adapt_threads=machine.adapts_threads(stage.torch_threads),
        # Accelerate sets up multi-process CPU training (gloo) only when told it runs on the CPU
        dataloader_pin_memory=_has_cuda(), use_cpu=not _has_cuda(),
        train_sampling_strategy="group_by_length" if stage.group_by_length else "random",
        length_group_batches=mega_batch_factor(stage.group_by_length),
        ddp_find_unused_parameters=_may_leave_parameters_unused(stage),
        ddp_backend=recipe.distributed.backend,
    )
    settings.update(distributed_arguments(recipe, model))
    return MedtuneTrainingArguments(**settings)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _may_leave_parameters_unused(stage: Stage) -> bool:
    """LLaVA feeds a hidden layer below the tower's top to the projector: a trained tower has unused layers."""
    return stage.lr.vision > 0 or (stage.lora is not None and stage.lora.on_vision)


def distributed_arguments(recipe: Recipe, model) -> dict:
    """Trainer arguments for the recipe's sharding strategy; nothing for a plain single process (one started by
    torchrun or accelerate launch, even alone, runs the engine: FSDP2 / ZeRO-3 offload on one GPU)."""
    if not launched_distributed():
        return {}
    spec = recipe.distributed
    if spec.deepspeed_config:
        return {"deepspeed": spec.deepspeed_config}
    if spec.strategy in ("zero2", "zero3"):
        return {"deepspeed": deepspeed_config(int(spec.strategy[-1]))}
    if spec.strategy == "fsdp2":
        config = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                  "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True,
                  **spec.fsdp_config}
        return {"fsdp": "full_shard auto_wrap", "fsdp_config": config}
    return {}


def deepspeed_config(zero_stage: int) -> dict:
    """A DeepSpeed ZeRO-2/3 config whose batch and precision settings follow TrainingArguments ("auto")."""
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if zero_stage == 3:
        # gather full weights on save so checkpoints are plain safetensors that load in one process
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto"}


def read_metrics(path: str | Path) -> list[dict]:
    """The metrics.jsonl of a stage, as a list of dicts (for tests and reports)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
