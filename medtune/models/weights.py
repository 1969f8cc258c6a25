"""Weight files looked at before any library loads them, so a damaged or hostile file is one error naming it.

* :func:`check_safetensors` reads the header of every ``*.safetensors`` file of a checkpoint folder (and its
  sub-folders one level down: a discrete model keeps its image tokenizer there). Only the header is read, so
  the check costs milliseconds whatever the file's size; a header that is too large, not JSON, or describes
  tensors past the end of the file, a truncated file and an empty one are each refused with the reason.
* :func:`refused_pickle` words the error of a pickled weight file (``*.bin``, ``*.pt``, ``*.pth``) that holds
  more than tensors. Such files are only ever read with ``torch.load(weights_only=True)`` (transformers does so
  too), which refuses to build other objects; the error it raises suggests ``weights_only=False``, which would run
  the file's code. medtune never does that and says what to do instead.
* :func:`tensors_named` reads the tensors of a checkpoint whose names hold a marker without building a model
  (pickles as tensors only), and :func:`llava_projector_state` uses it for LLaVA's ``mm_projector`` tensors
  (a checkpoint saved by LLaVA's code, or a stage-1 ``mm_projector.bin``), renamed for medtune's projectors.
"""
from __future__ import annotations

import os
from pathlib import Path

from medtune.errors import InputFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_REFUSAL = ("a pickled weight file holding objects other than tensors; medtune reads pickles only as "
                  "tensors and never runs code from a checkpoint. Convert the weights to safetensors on a machine "
                  "where the file is trusted.")
# What Trainer pickles into a checkpoint beside the model: training state, never weights.
TRAINER_STATE_PICKLES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin")


def pickled_weights(folder: str | os.PathLike) -> list[Path]:
    """The pickled files of ``folder`` that may hold model weights (Trainer's own state left out)."""
    return sorted(path for path in Path(folder).iterdir() if path.suffix in PICKLE_SUFFIXES
                  and path.name not in TRAINER_STATE_PICKLES and not path.name.startswith("rng_state"))


def check_safetensors(folder: str | os.PathLike) -> None:
    """Raise :class:`InputFileError` naming the first ``*.safetensors`` file of ``folder`` whose header is unusable."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    for path in sorted([*folder.glob("*.safetensors"), *folder.glob("*/*.safetensors")]):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as error:
            reason = str(error).removeprefix("Error while deserializing header: ")
            raise InputFileError(f"{path}: not a usable safetensors file ({reason})") from None


def refused_pickle(source: str | os.PathLike) -> InputFileError:
    """The error for a checkpoint whose pickled weights ``torch.load(weights_only=True)`` refused."""
    files = pickled_weights(source) if Path(source).is_dir() else []
    names = ", ".join(path.name for path in files) or "its pickled weights"
    where = str(files[0]) if len(files) == 1 else f"{source} ({names})"
    return InputFileError(f"{where}: {PICKLE_REFUSAL}")


def tensors_named(source: str | os.PathLike, marker: str) -> dict:
    """Every tensor of ``source`` (a folder's safetensors, else its pickled weight files, or one weight file)
    whose name holds ``marker``, read without building a model; pickles only as tensors."""
    import pickle

    import torch
    from safetensors import safe_open

    source = Path(source)
    files = [source] if source.is_file() else sorted(source.glob("*.safetensors")) or pickled_weights(source)
    found = {}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                found.update({key: handle.get_tensor(key) for key in handle.keys() if marker in key})
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:   # weights_only refuses anything but tensors and plain containers
                raise InputFileError(f"{path}: {PICKLE_REFUSAL}") from None
            found.update({key: value for key, value in state.items() if marker in key})
    return found


# LLaVA's projector tensors (``model.mm_projector.*``: a checkpoint saved by LLaVA's code, or a stage-1
# ``mm_projector.bin``) under the names of medtune's projectors: ``mlp2x_gelu`` is LLaVA's Sequential (indices 0
# and 2), ``linear`` a bare Linear (no index).
LLAVA_PROJECTOR_KEYS = {"mlp2x_gelu": {"0.": "linear_1.", "2.": "linear_2."}, "linear": {"": "linear."}}
# MoE-LLaVA and Med-MoE nest the image projector one level down (their projector also holds video parts).
MOE_LLAVA_IMAGE_PROJECTOR = "image_spatial_proj."


def llava_projector_state(source, projector: str) -> dict:
    """The projector tensors of a LLaVA checkpoint folder or projector file, renamed for ``projector``; a
    tensor no rule renames keeps its name (and is reported as unexpected by the loader)."""
    renames = LLAVA_PROJECTOR_KEYS[projector]
    state = {}
    for key, tensor in tensors_named(source, "mm_projector.").items():
        rest = key.split("mm_projector.", 1)[1]   # LLaVA's own rule: any prefix before mm_projector.
        rest = rest.removeprefix(MOE_LLAVA_IMAGE_PROJECTOR)
        new = next((new + rest[len(old):] for old, new in renames.items() if rest.startswith(old)), rest)
        state[new] = tensor
    if not state:
        raise InputFileError(f"{source}: no mm_projector weights found")
    return state
