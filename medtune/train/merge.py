"""Merge LoRA adapters into their base model: a plain checkpoint that needs neither medtune nor PEFT.

A LoRA checkpoint (a Trainer ``checkpoint-N`` or a stage's ``adapter/``) holds the adapters, any part trained
whole beside them (the projector, PEFT's ``modules_to_save``), the tokenizer with the stage's chat template,
and ``adapter_config.json`` naming the base model. :func:`merge_checkpoint` loads the base, applies the
adapters with PEFT, folds them into the weights (``merge_and_unload``) and writes the result as medtune writes
every model (:func:`medtune.models.export.save_model`: safetensors under released key names, remote code for
medtune's own classes), together with the checkpoint's tokenizer, processor and medtune.json, into a directory
that appears only when complete. A checkpoint without adapters (full fine-tuning) is already plain: its model
files are copied as they are.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from medtune.errors import InputFileError, UserError
from medtune.models.weights import PICKLE_SUFFIXES, pickled_weights
from medtune.train.checkpoints import atomic_directory

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
# Everything Trainer writes into a checkpoint that is training state, not part of a model.
_TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin",
                   "medtune-complete.json", "README.md")
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", ADAPTER_CONFIG)


def merge_checkpoint(checkpoint: str | Path, out: str | Path, *, base: str | Path | None = None) -> Path:
    """Write ``checkpoint`` (LoRA or full) as a plain model into ``out``; returns ``out``."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint directory")
    if out.exists():
        raise UserError(f"{out} already exists; choose a new output directory")
    with atomic_directory(out) as staging:
        if (checkpoint / ADAPTER_CONFIG).is_file():
            _merge_adapters(checkpoint, staging, base)
        elif (checkpoint / "config.json").is_file():
            _require_safetensors(checkpoint)
            _copy_model_files(checkpoint, staging, skip=())
        else:
            raise UserError(f"{checkpoint} is neither a LoRA checkpoint (no {ADAPTER_CONFIG}) nor a model "
                            "(no config.json)")
    return out


def _merge_adapters(checkpoint: Path, out: Path, base: str | Path | None) -> None:
    import torch
    from peft import PeftModel

    from medtune.models.export import save_model
    from medtune.models.kinds.base import checkpoint_model_class
    from medtune.models.registry import register_model_classes

    register_model_classes()
    base = Path(base) if base is not None else _base_of(checkpoint)
    model = checkpoint_model_class(base).from_pretrained(str(base), dtype=torch.float32)   # experts included
    model = PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
    save_model(model, out)
    # tokenizer (with this stage's chat template), processor and medtune.json come from the checkpoint;
    # anything it lacks (an image processor saved only with the base) from the base
    _copy_model_files(checkpoint, out, skip=_ADAPTER_FILES)
    _copy_model_files(base, out, skip=("config.json", "generation_config.json"), weights=False, overwrite=False)


def _require_safetensors(checkpoint: Path) -> None:
    """A full checkpoint is copied as it is, and only safetensors weights are copied: one whose weights are
    pickles would come out without weights, so it is refused, naming the file."""
    if any(checkpoint.glob("*.safetensors")):
        return
    pickled = pickled_weights(checkpoint)
    what = f"{pickled[0]}: its weights are a pickle" if pickled else f"{checkpoint}: it has no weight file"
    raise InputFileError(f"{what}; merge copies a full checkpoint's safetensors weights only (it never unpickles "
                         "them): convert the weights to safetensors on a machine where the file is trusted")


def _base_of(checkpoint: Path) -> Path:
    config = json.loads((checkpoint / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    name = config.get("base_model_name_or_path")
    if not name or not Path(name).is_dir():
        raise UserError(f"{checkpoint}: its base model {name!r} is not a local directory; pass --base")
    return Path(name)


def _copy_model_files(source: Path, out: Path, *, skip, weights: bool = True, overwrite: bool = True) -> None:
    for path in source.iterdir():
        if not path.is_file() or path.name in _TRAINING_STATE or path.name in skip:
            continue
        if path.name.startswith("rng_state") or path.suffix in PICKLE_SUFFIXES:
            continue   # pickled training state never travels into a model directory
        is_weights = path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json")
        if is_weights and not weights:
            continue
        if overwrite or not (out / path.name).exists():
            shutil.copy2(path, out / path.name)
