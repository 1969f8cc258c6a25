"""``medtune model build`` and ``medtune model info``.

    medtune model build tiny out/tiny-vlm projector=attn_pool+mlp2x_gelu template=chatml
    medtune model build my-spec.yaml out/vlm llm=path/to/llm
    medtune model info out/tiny-vlm

A model is named by a preset (tiny, small) or a YAML file of ModelSpec fields; ``key=value`` overrides
are parsed as YAML values (``image_size=64`` is an int, ``image_mean=[0.5,0.5,0.5]`` a list). Heavy
imports happen inside the verbs so that ``medtune --help`` stays fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers) -> None:
    model = subparsers.add_parser("model", help="build or inspect a vision-language model")
    verbs = model.add_subparsers(dest="model_verb", metavar="ACTION", required=True)

    build = verbs.add_parser("build", help="build a composed VLM (random projector) and save it")
    build.add_argument("spec", help="a preset (tiny, small) or a YAML file of ModelSpec fields")
    build.add_argument("out", type=Path, help="output folder (safetensors checkpoint)")
    build.add_argument("overrides", nargs="*", metavar="key=value", help="ModelSpec fields to change")
    build.set_defaults(func=run_build)

    info = verbs.add_parser("info", help="describe a saved VLM: parts, parameters, template, image tokens")
    info.add_argument("path", help="a checkpoint folder (or hub name)")
    info.set_defaults(func=run_info)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    from medtune.errors import UserError

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"override {pair!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def load_spec(name: str, overrides: dict[str, Any]):
    """A ModelSpec from a preset name or a YAML file, with overrides applied."""
    import yaml

    from medtune.errors import UserError
    from medtune.models.build import ModelSpec
    from medtune.models.presets import PRESETS, preset_spec

    if name in PRESETS:
        return preset_spec(name, **overrides)
    path = Path(name)
    if not path.is_file():
        raise UserError(f"{name} is neither a model preset ({', '.join(PRESETS)}) nor a spec file")
    settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(settings, dict):
        raise UserError(f"{path}: a model spec file must be a YAML mapping of ModelSpec fields")
    try:
        return ModelSpec.from_dict({**settings, **overrides})
    except (TypeError, ValueError) as error:
        raise UserError(f"{path}: {error}") from error


def run_build(args: argparse.Namespace) -> int:
    from medtune.errors import UserError
    from medtune.models.build import build_vlm

    spec = load_spec(args.spec, parse_overrides(args.overrides))
    try:
        vlm = build_vlm(spec)
    except OSError as error:  # a part that is neither a local checkpoint nor reachable on the hub
        raise UserError(f"cannot load a model part: {error}") from error
    vlm.save(args.out)
    print(f"built {type(vlm.model).__name__} ({vlm.num_parameters():,} parameters, {vlm.image_tokens_per_image} "
          f"image tokens per image, template {vlm.template}) -> {args.out}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from medtune.models.build import load_vlm

    vlm = load_vlm(args.path)
    print(f"{args.path}: {type(vlm.model).__name__}, {vlm.num_parameters():,} parameters, dtype {vlm.model.dtype}")
    for line in vlm.describe():
        print(f"  {line}")
    return 0
