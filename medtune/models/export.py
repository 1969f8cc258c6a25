"""Checkpoints that other engines load and serve as medtune does: key layout, remote code, the export contract.

A checkpoint medtune writes (``VLM.save``, every Trainer checkpoint, ``medtune merge``) is a plain Hugging Face
model directory. What it holds, and who writes what, is the *export contract* (also in docs/serving.md):

=========================  =======================================================  ==================================
file(s)                    what                                                     written by
=========================  =======================================================  ==================================
model*.safetensors,        weights under the key names released checkpoints use     :func:`save_model` (``VLM.save``,
config.json                (``vision_tower.vision_model.*``, ``language_model.      merge), or Trainer after
                           model.*`` for Llava; one key per expert for MoE), and    :func:`use_released_layout`
                           the config
tokenizer files,           the tokenizer with the chat template medtune trains      the kind's export hook
chat_template.jinja        with, so every engine builds the same prompt             (``VLM.write_beside_weights``)
processor_config.json,     the processor that makes the pixels medtune trains on    the export hook
preprocessor_config.json   (``pad_mode`` included: vision.squaring_image_processor)
medtune.json               the kind and what medtune's own loader needs             the export hook
``*.py`` + ``auto_map``    the model's code, when its class is medtune's own (no    the export hook
in config.json             native class exists): :func:`write_remote_code`          (:func:`write_remote_code`)
=========================  =======================================================  ==================================

Design choices:

* Key layout. transformers 5 keeps module trees that differ from the checkpoints released for its models
  (CLIPVisionModel and SiglipVisionModel hold their layers directly, released towers under ``vision_model.``;
  Llava holds ``model.language_model``, released llava-hf checkpoints ``language_model.model``). It ships the
  mapping between the two (``transformers.conversion_mapping``), applies it when loading and, when saving,
  reverses the part that matched on loading (``save_original_format``). A model medtune composes in memory
  was never loaded, and one loaded from an older medtune checkpoint matched only part of it, so each would be
  saved in some other layout. :func:`use_released_layout` gives the model the whole mapping of its classes to
  reverse: medtune writes released names whatever the installed transformers' module tree is, and every
  loader (medtune's, plain transformers', vLLM's) reads them; transformers' forward mapping also still reads
  the layouts older medtune versions wrote. The MoE kind's per-expert keys are a mapping registered the same
  way (:func:`medtune.models.moe.layers.register_checkpoint_layout`), so they go through the same two steps.
* Remote code, one source of truth: the files beside the weights are medtune's own modules, copied at export
  time, with each ``from medtune.<...>.<module> import names`` turned into ``from .<module> import names``
  (:func:`remote_code_files`). transformers' dynamic-module loader copies a file's relative imports with it,
  so ``from_pretrained(path, trust_remote_code=True)`` runs exactly medtune's classes without medtune. A module
  that reaches medtune any other way (``import medtune``, ``from medtune.models import moe``) cannot be copied
  and the export says so, naming the line.
"""
from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

PACKAGE = "medtune"
CONFIG_FILE = "config.json"


def base_model_of(model):
    """The transformers model under a PEFT wrapper (``get_base_model``), or ``model`` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


# -------------------------------------------------------------------------------------------- key layout


def use_released_layout(model) -> None:
    """Make ``model.save_pretrained`` write the key names of released checkpoints (see the module docstring).

    transformers reverses ``model._weight_conversions`` on saving (the transforms its ``from_pretrained`` used;
    for a model built in memory, the class mappings minus prefix changes); this sets them to every transform
    the model's classes have, medtune's registered MoE layout included. Idempotent; call it before saving.
    """
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping

    model = base_model_of(model)
    if isinstance(model, PreTrainedModel):
        # the "legacy" renamings are load-only fixes (gamma/beta -> weight/bias): never written back
        model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)


def save_model(model, out_dir: str | Path) -> None:
    """Weights (safetensors, released key layout) and config, plus the remote code of a medtune class."""
    model = base_model_of(model)
    use_released_layout(model)
    model.save_pretrained(str(out_dir))
    write_remote_code(model, out_dir)


# ------------------------------------------------------------------------------------------- remote code


def is_medtune_class(model) -> bool:
    """Whether the model's class is medtune's own (no transformers class can load its checkpoint)."""
    return type(base_model_of(model)).__module__.split(".")[0] == PACKAGE


def auto_classes(model) -> dict[str, type]:
    """The Auto class -> class pairs a medtune model registers: of its config, itself and its base model, those
    that are medtune's own (a medtune subclass of a transformers model, such as the discrete kind's Chameleon,
    keeps transformers' config and base model, which transformers loads by itself)."""
    model = base_model_of(model)
    classes = {"AutoConfig": type(model.config), "AutoModelForImageTextToText": type(model)}
    base = getattr(model, "base_model", model)
    if base is not model:
        classes["AutoModel"] = type(base)
    return {auto: cls for auto, cls in classes.items() if cls.__module__.split(".")[0] == PACKAGE}


def write_remote_code(model, out_dir: str | Path) -> list[Path]:
    """For a model whose class is medtune's own, and a directory with a config.json (not a LoRA checkpoint):
    the module files :func:`remote_code_files` makes, and ``auto_map`` in config.json. Returns the files
    written (none for a transformers class)."""
    out_dir = Path(out_dir)
    config_path = out_dir / CONFIG_FILE
    if not is_medtune_class(model) or not config_path.is_file():
        return []
    classes = auto_classes(model)
    written = []
    for name, text in remote_code_files(*sorted({cls.__module__ for cls in classes.values()})).items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    entries = {auto: f"{_stem(cls.__module__)}.{cls.__name__}" for auto, cls in classes.items()}
    config["auto_map"] = {**config.get("auto_map", {}), **entries}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


def remote_code_files(*modules: str) -> dict[str, str]:
    """{file name: source} for ``modules`` (dotted medtune module names) and every medtune module they import,
    each file the module's own source with its medtune imports made relative (see the module docstring)."""
    from medtune import __version__

    files: dict[str, str] = {}
    origins: dict[str, str] = {}
    pending = list(modules)
    while pending:
        name = pending.pop()
        stem = _stem(name)
        if stem in origins:
            if origins[stem] != name:
                raise ValueError(f"remote code: {name} and {origins[stem]} would both be written as {stem}.py")
            continue
        path = _source_path(name)
        text, imported = relative_imports(path.read_text(encoding="utf-8"), where=str(path))
        origins[stem] = name
        header = (f"# {name} of medtune {__version__}, copied beside the weights by medtune.models.export with\n"
                  f"# its medtune imports made relative: the files in this folder import each other, not medtune.\n")
        files[f"{stem}.py"] = header + text
        pending.extend(imported)
    return files


def relative_imports(source: str, *, where: str = "<source>") -> tuple[str, list[str]]:
    """``source`` with each ``from medtune.<...>.<module> import names`` made ``from .<module> import names``,
    and the medtune modules it imported; any other way of reaching medtune is an error naming the line."""
    lines = source.splitlines(keepends=True)
    imported = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.Import) and any(_is_medtune(alias.name) for alias in node.names):
            raise ValueError(f"{where}:{node.lineno}: `import medtune...` cannot be copied as remote code; "
                             "write `from medtune.<module> import <names>`")
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and _is_medtune(node.module or "")):
            continue
        if _source_path(node.module).name == "__init__.py":
            raise ValueError(f"{where}:{node.lineno}: `from {node.module} import ...` imports from a package; "
                             "import the names from their module, so the module can be copied beside it")
        line = lines[node.lineno - 1]
        old, new = f"from {node.module}", f"from .{_stem(node.module)}"
        start = line.index(old, node.col_offset)
        lines[node.lineno - 1] = line[:start] + new + line[start + len(old):]
        imported.append(node.module)
    rewritten = "".join(lines)
    leftover = [node.lineno for node in ast.walk(ast.parse(rewritten)) if isinstance(node, ast.ImportFrom)
                and node.level == 0 and _is_medtune(node.module or "")]
    if leftover:
        raise ValueError(f"{where}:{leftover[0]}: a medtune import could not be made relative")
    return rewritten, imported


def _is_medtune(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _stem(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _source_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ValueError(f"remote code: no Python source for {module}")
    return Path(spec.origin)
