"""Where medtune finds its bundled data and recipes.

In a source checkout (editable install) these are the repository's ``data/`` and ``recipes/`` folders;
``MEDTUNE_HOME`` points elsewhere (e.g. a copy of the repository next to a wheel install).
"""
from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    return Path(os.environ.get("MEDTUNE_HOME", Path(__file__).resolve().parent.parent))


def bundled_data(*parts: str) -> Path:
    """A path inside the bundled data folder, e.g. ``bundled_data("vqa_rad", "testset.json")``."""
    path = project_root().joinpath("data", *parts)
    if not path.exists():
        raise FileNotFoundError(f"bundled data not found at {path}; set MEDTUNE_HOME to a medtune checkout")
    return path


def recipe_path(name: str) -> Path:
    """A shipped recipe by name (``demo`` -> recipes/demo.yaml) or the path as given if it exists."""
    if Path(name).is_file():
        return Path(name)
    path = project_root() / "recipes" / f"{name.removesuffix('.yaml')}.yaml"
    if not path.exists():
        shipped = sorted(p.stem for p in (project_root() / "recipes").glob("*.yaml"))
        raise FileNotFoundError(f"no recipe file {name!r} and no shipped recipe of that name (shipped: {shipped})")
    return path
