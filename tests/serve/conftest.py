"""Fixtures for the serving tests: a tiny saved checkpoint and a Generator on it (the reference answers)."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """presets.tiny_spec -> build_vlm -> save: a real checkpoint on disk, as `medtune serve` gets it."""
    pytest.importorskip("torch")
    from medtune.models import presets
    from medtune.models.build import build_vlm

    out = tmp_path_factory.mktemp("models") / "tiny-vlm"
    build_vlm(presets.tiny_spec()).save(out)
    return out


@pytest.fixture(scope="session")
def generator(tiny_model_dir):
    """The reference: a Generator on the same checkpoint, loaded the way the server loads it."""
    import torch

    from medtune.models.build import load_vlm
    from medtune.models.generation import Generator

    torch.set_num_threads(1)
    return Generator(load_vlm(tiny_model_dir))
