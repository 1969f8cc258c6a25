"""Where medtune finds its bundled data and recipes.

In a source checkout (editable install) these are the repository's ``data/`` and ``recipes/`` folders;
``MEDTUNE_HOME`` points elsewhere (e.g. a copy of the repository next to a wheel install).
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path


def project_root() -> Path:
    return Path(os.environ.get("MEDTUNE_HOME", Path(__file__).resolve().parent.parent))


def bundled_data(*parts: str) -> Path:
    """A path inside the bundled data folder, e.g. ``bundled_data("vqa_rad", "testset.json")``."""
    path = project_root().joinpath("data", *parts)
    if not path.exists():
        raise FileNotFoundError(f"bundled data not found at {path}; set MEDTUNE_HOME to a medtune checkout")
    return path


def resolve_data_path(path: str) -> Path:
    """A data path as written in a recipe; ``bundled:vqa_rad/trainset.json`` names the bundled data."""
    if path.startswith("bundled:"):
        return bundled_data(*path.removeprefix("bundled:").split("/"))
    return Path(path).expanduser()


def recipe_path(name: str) -> Path:
    """A shipped recipe by name (``demo`` -> recipes/demo.yaml) or the path as given if it exists."""
    if Path(name).is_file():
        return Path(name)
    path = project_root() / "recipes" / f"{name.removesuffix('.yaml')}.yaml"
    if not path.exists():
        shipped = sorted(p.stem for p in (project_root() / "recipes").glob("*.yaml"))
        raise FileNotFoundError(f"no recipe file {name!r} and no shipped recipe of that name (shipped: {shipped})")
    return path


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as a person would type it here: relative to the current folder when it is below it, absolute
    otherwise, quoted for the shell."""
    relative = os.path.relpath(Path(path).absolute())
    return shlex.quote(relative if not relative.startswith("..") else str(Path(path).absolute()))


def shell_command(argv0: str | None = None, search_path: str | None = None) -> str:
    """How to run this medtune from the shell that started it, so that a printed command runs as printed.

    ``medtune`` when that name on ``$PATH`` is this installation's entry script; else the entry script's path
    (``.venv/bin/medtune`` after ``make demo``, whose shell never activated the venv); else
    ``PYTHON -m medtune``. ``argv0`` and ``search_path`` replace ``sys.argv[0]`` and ``$PATH`` (for tests)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    candidates = [Path(argv0), Path(sys.executable).parent / "medtune"]
    entry = next((c for c in candidates if c.name == "medtune" and c.is_file()), None)
    if entry is None:
        return f"{shlex.quote(sys.executable)} -m medtune"
    on_path = shutil.which("medtune", path=search_path)
    if on_path and os.path.samefile(on_path, entry):
        return "medtune"
    return shown_path(entry)
