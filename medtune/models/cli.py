"""``medtune model build``, ``info``, ``import`` (a LLaVA / LLaVA-Med checkpoint) and the exports.

    medtune model build tiny out/tiny-vlm projector=attn_pool+mlp2x_gelu template=chatml
    medtune model build my-spec.yaml out/vlm llm=path/to/llm
    medtune model info out/tiny-vlm

A model is named by a preset (tiny, small) or a YAML file of ModelSpec fields; ``key=value`` overrides
are parsed as YAML values (``image_size=64`` is an int, ``image_mean=[0.5,0.5,0.5]`` a list). Heavy
imports happen inside the verbs so that ``medtune --help`` stays fast.

Every verb that takes a checkpoint checks it first with :func:`check_model_path` (also used by ``eval run`` and
``merge``): a local-looking path that is missing, a file, a folder without a readable model config, is one line
("no model checkpoint at ./x"), not a hub lookup's traceback.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from medtune.distributed import process_device   # environment only: no torch at import


def register(subparsers) -> None:
    model = subparsers.add_parser("model", help="build or inspect a vision-language model",
                                  description="Build a vision-language model from a preset or a spec, describe a "
                                              "saved one, or export one in another library's layout.")
    verbs = model.add_subparsers(dest="model_verb", metavar="ACTION", required=True)

    build = verbs.add_parser("build", help="build a composed VLM (random projector) and save it",
                             description="Compose a vision tower, a projector (randomly initialised) and a language "
                                         "model from SPEC, with key=value overrides parsed as YAML values, and save "
                                         "the result to OUT as a safetensors checkpoint.")
    build.add_argument("spec", help="a preset (tiny, small) or a YAML file of ModelSpec fields")
    build.add_argument("out", type=Path, help="output folder (safetensors checkpoint)")
    build.add_argument("overrides", nargs="*", metavar="key=value", help="ModelSpec fields to change")
    build.set_defaults(func=run_build)

    info = verbs.add_parser("info", help="describe a saved VLM: parts, parameters, template, image tokens",
                            description="Describe the model at PATH: its vision tower, projector and language "
                                        "model, parameter count, dtype, chat template and image tokens.")
    info.add_argument("path", help="a checkpoint folder (or hub name)")
    info.set_defaults(func=run_info)

    export = verbs.add_parser("export-native", help="write an upcycled Qwen2 MoE model as Llava + Qwen2-MoE, "
                                                    "which plain transformers and vLLM load without medtune",
                              description="Write CHECKPOINT (a medtune MoE model whose LLM is Qwen2) to OUT as a "
                                          "Llava model with a Qwen2-MoE language model: a complete checkpoint that "
                                          "plain transformers loads without medtune.")
    export.add_argument("checkpoint", help="a medtune MoE checkpoint (kind moe) whose LLM is Qwen2")
    export.add_argument("out", type=Path, help="output folder (a complete native checkpoint)")
    export.set_defaults(func=run_export_native)

    imported = verbs.add_parser("import", help="write a medtune checkpoint from one LLaVA, LLaVA-Med or Med-MoE's "
                                               "own code saved (llava, llava_llama, llava_mistral, llava_phi, "
                                               "moe_llava_phi), or a Chameleon-layout release (MedMax, Anole)",
                                description="Read SOURCE, a checkpoint folder saved by LLaVA's, LLaVA-Med's or "
                                            "Med-MoE's own code (config with mm_vision_tower or mm_image_tower, "
                                            "model.mm_projector.* weights), and write OUT: a composed model "
                                            "(transformers' Llava for mlp2x_gelu), or medtune's moe kind for a "
                                            "Med-MoE stage-3 model, with the vision tower the config names, the "
                                            "checkpoint's tokenizer and the chat template of the conversation mode. "
                                            "Settings medtune does not reproduce (anyres, im_start/im_end tokens, "
                                            "other projectors, top-2 routing) are refused by name. A release in "
                                            "Chameleon's own layout (models/7b/consolidated.pth + tokenizer/, e.g. "
                                            "mint-medmax/medmax_7b) becomes the discrete kind with its VQGAN "
                                            "decoder attached.")
    imported.add_argument("source", help="the checkpoint folder (or hub name)")
    imported.add_argument("out", type=Path, help="output folder (a medtune checkpoint)")
    imported.add_argument("--vision-tower", help="the tower checkpoint to use instead of the one the config names "
                                                 "(a local copy of it, e.g. clip-vit-large-patch14-336)")
    imported.add_argument("--conv-mode", help="the LLaVA conversation mode it is prompted with: mistral_instruct "
                                              "(llava_mistral's default), vicuna_v1, llava_v1 (llava_llama's), "
                                              "llava_llama_2; phi for Med-MoE (its default)")
    imported.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                          help="weight dtype of the written checkpoint (default float32)")
    imported.set_defaults(func=run_import)

    chameleon = verbs.add_parser("export-chameleon", help="write a discrete-token (Chameleon/Anole) checkpoint in "
                                                          "Chameleon's original format (consolidated.pth + params.json)",
                                 description="Write CHECKPOINT (a Chameleon-family model, kind discrete) to OUT in "
                                             "Chameleon's original layout: consolidated.pth, params.json and "
                                             "consolidate_params.json, as Chameleon's loader and MedMax's "
                                             "converter read them.")
    chameleon.add_argument("checkpoint", help="a Chameleon-family checkpoint (kind discrete), e.g. a merged MedMax "
                                              "stage")
    chameleon.add_argument("out", type=Path, help="output folder (models/7b-style: consolidated.pth, params.json, "
                                                  "consolidate_params.json)")
    chameleon.set_defaults(func=run_export_chameleon)

    tower = verbs.add_parser("import-tower", help="write a timm Vision Transformer (e.g. the pathology tower UNI) as a "
                                                  "transformers vision tower medtune models can use",
                             description="Read SOURCE, a timm ViT in timm's hub format (config.json with "
                                         "'architecture', pytorch_model.bin or model.safetensors; e.g. a local "
                                         "copy of MahmoodLab/UNI), and write OUT: the same network as transformers' "
                                         "DINOv2 model with its image processor, to name as a model's vision tower "
                                         "(vision: OUT in a recipe, --vision-tower OUT). Register tokens, q/k norms, "
                                         "SwiGLU MLPs and attention-pool heads are refused by name.")
    tower.add_argument("source", type=Path, help="the timm checkpoint folder")
    tower.add_argument("out", type=Path, help="output folder (a transformers Dinov2Model)")
    tower.set_defaults(func=run_import_tower)

    decoder = verbs.add_parser("attach-decoder", help="give a Chameleon-family checkpoint the VQGAN pixel decoder it "
                                                      "needs to answer with images",
                               description="Write the pixel decoder of Chameleon's VQGAN (the vqgan.yaml + vqgan.ckpt "
                                           "of a Chameleon / Anole / MedMax release's tokenizer/ folder, read as "
                                           "tensors only) into CHECKPOINT as vqgan_decoder.safetensors + .json, "
                                           "which medtune loads with it from then on. Hugging Face Chameleon "
                                           "checkpoints (e.g. mint-medmax/medmax_7b_hf) hold only the encoder.")
    decoder.add_argument("checkpoint", type=Path, help="a local Chameleon-family checkpoint folder (kind discrete)")
    decoder.add_argument("vqgan", type=Path, help="the folder holding vqgan.yaml and vqgan.ckpt")
    decoder.set_defaults(func=run_attach_decoder)
    _add_tokenize_images(subparsers)


def looks_local(model: str) -> bool:
    """Whether ``model`` names a local folder rather than a hub repo ("org/name" is a hub name unless it exists)."""
    path = Path(model).expanduser()
    return path.is_absolute() or model.startswith((".", "~")) or path.exists()


def check_model_path(model: str | os.PathLike, *, configs: tuple[str, ...] = ("config.json",)) -> str:
    """``model`` unchanged when it is a hub name or a folder holding a readable model config; else one clear error.

    ``configs``: the files of which one must be there (``merge`` also takes a LoRA ``adapter_config.json``).
    """
    from medtune.errors import InputFileError
    from medtune.models.weights import check_safetensors

    model = os.fspath(model)
    if not looks_local(model):
        return model
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no model checkpoint at {model} (a folder with {configs[0]})")
    if not path.is_dir():
        raise InputFileError(f"{model} is a file, not a model checkpoint (a folder with {configs[0]})")
    config = next((path / name for name in configs if (path / name).is_file()), None)
    if config is None:
        raise InputFileError(f"{model} is not a model checkpoint (no {' or '.join(configs)})")
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except PermissionError:
        raise InputFileError(f"{config}: permission denied (cannot read the model config)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputFileError(f"{config}: not a readable model config ({error})") from None
    if not isinstance(settings, dict) or not (settings.get("model_type") or settings.get("peft_type")):
        raise InputFileError(f"{config} describes no model (it needs a model_type)")
    check_safetensors(path)
    return model


def load_checkpoint(model: str | os.PathLike, **options):
    """:func:`medtune.models.build.load_vlm` after :func:`check_model_path`; a checkpoint that still does not
    load (a hub name not in the cache offline, a broken weight file) is one line naming it."""
    from medtune.errors import UserError
    from medtune.models.build import load_vlm

    model = check_model_path(model)
    try:
        return load_vlm(model, **options)
    except UserError:
        raise
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a model from {model}: {' '.join(str(error).split())}") from error


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

    from medtune.data.files import readable_text_file

    if name in PRESETS:
        return preset_spec(name, **overrides)
    path = Path(name)
    if not path.exists():
        raise UserError(f"{name} is neither a model preset ({', '.join(PRESETS)}) nor a spec file")
    readable_text_file(path, "model spec (YAML)")
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
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
    vlm = load_checkpoint(args.path)
    print(f"{args.path}: {type(vlm.model).__name__}, {vlm.num_parameters():,} parameters, dtype {vlm.model.dtype}")
    for line in vlm.describe():
        print(f"  {line}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    """``medtune model import SOURCE OUT``: see medtune/models/llava_import.py for what is read and refused."""
    from medtune.models.chameleon_import import import_chameleon_release, is_chameleon_release
    from medtune.models.llava_import import import_llava
    from medtune.models.med_moe_import import import_med_moe, is_moe_llava

    if is_chameleon_release(args.source):
        from medtune.errors import UserError

        if args.vision_tower or args.conv_mode:
            raise UserError(f"{args.source}: a Chameleon-layout release has no vision tower or LLaVA conversation "
                            "mode to choose (--vision-tower, --conv-mode)")
        vlm = import_chameleon_release(args.source, args.out, dtype=args.dtype)
        print(f"wrote {args.out}: {type(vlm.model).__name__} (kind discrete), {vlm.num_parameters():,} parameters, "
              f"{vlm.image_tokenizer.codes_per_image} codes per image, VQGAN decoder attached")
        return 0
    check_model_path(args.source)
    from medtune.models.pathchat_import import import_pathchat, is_pathchat

    if is_pathchat(args.source):
        vlm = import_pathchat(args.source, args.out, conv_mode=args.conv_mode, dtype=args.dtype)
        print(f"wrote {args.out}: {type(vlm.model).__name__}, {vlm.num_parameters():,} parameters, template "
              f"{vlm.template}, {vlm.image_tokens_per_image} image tokens per image")
        return 0
    importer = import_med_moe if is_moe_llava(args.source) else import_llava
    vlm = importer(args.source, args.out, vision_tower=args.vision_tower, conv_mode=args.conv_mode, dtype=args.dtype)
    print(f"wrote {args.out}: {type(vlm.model).__name__}, {vlm.num_parameters():,} parameters, template "
          f"{vlm.template}, {vlm.image_tokens_per_image} image tokens per image")
    return 0


def run_export_native(args: argparse.Namespace) -> int:
    """``medtune model export-native CHECKPOINT OUT``: see medtune/models/moe/qwen2_export.py for what maps exactly."""
    from medtune.models.moe.qwen2_export import save_native_qwen2_moe

    report = save_native_qwen2_moe(load_checkpoint(args.checkpoint), args.out)
    bias, probe = report["router_bias"], report["probe"]
    print(f"wrote {args.out}: Llava + Qwen2-MoE, MoE layers {report['moe_layers']}, {report['num_experts']} "
          f"experts, top-{report['num_experts_per_tok']}; router bias dropped (largest |b| {bias['max_abs']:.3g}, "
          f"spread {bias['max_spread']:.3g}); on the probe ({probe['tokens']} tokens) routing agreement "
          f"{probe['routing_agreement']:.4f}, largest logit difference {probe['max_abs_logit_diff']:.3g}")
    return 0


def run_export_chameleon(args: argparse.Namespace) -> int:
    """``medtune model export-chameleon CHECKPOINT OUT``: MedMax's ``bin_to_pth`` step, checked both ways in tests."""
    from medtune.errors import UserError

    vlm = load_checkpoint(args.checkpoint)
    try:
        out = vlm.export_original_format(args.out)
    except ValueError as error:
        raise UserError(f"{args.checkpoint}: {error}") from None
    print(f"wrote {out}/consolidated.pth, params.json and consolidate_params.json ({vlm.num_parameters():,} "
          "parameters less the VQ, which Chameleon reads from its tokenizer folder's vqgan.ckpt); copy the original "
          "model's tokenizer/ folder beside it for Chameleon's inference code")
    return 0


def run_import_tower(args: argparse.Namespace) -> int:
    """``medtune model import-tower SOURCE OUT``: see medtune/models/timm_import.py for the mapping."""
    from medtune.models.timm_import import import_timm_vit

    model = import_timm_vit(args.source, args.out)
    config = model.config
    print(f"wrote {args.out}: Dinov2Model, width {config.hidden_size}, {config.num_hidden_layers} blocks, "
          f"{config.num_attention_heads} heads, {config.image_size}-px images in {config.patch_size}-px patches; "
          f"use it as a model's vision tower (vision: {args.out})")
    return 0


def run_attach_decoder(args: argparse.Namespace) -> int:
    """``medtune model attach-decoder CHECKPOINT VQGAN``: see the verb's description."""
    from medtune.errors import UserError

    vlm = load_checkpoint(args.checkpoint)
    try:
        vlm.attach_decoder(args.vqgan)
    except FileNotFoundError as error:   # names the folder already
        raise UserError(str(error)) from None
    except ValueError as error:   # a kind without image codes, or a decoder of another size
        raise UserError(f"{args.checkpoint}: {error}") from None
    vlm.save_decoder(args.checkpoint)
    print(f"wrote {args.checkpoint}/vqgan_decoder.safetensors and vqgan_decoder.json (from {args.vqgan}): "
          f"{args.checkpoint} can now answer with images (--modalities image)")
    return 0


def _add_tokenize_images(subparsers) -> None:
    """``medtune tokenize-images``: see medtune/models/tokenize_images.py for the design."""
    parser = subparsers.add_parser(
        "tokenize-images", help="turn every image of a dataset into VQ codes (Parquet), sharded and resumable",
        description="Encode each image reference of INPUT (a data file, a CSV with an img_path/image_path/image/"
                    "path column, or a folder of images) with MODEL's own VQ image tokenizer (Chameleon/Anole, "
                    "Emu3, Janus) and write OUT (Parquet: id, image_index, image, codes). Shards by sample id "
                    "(--num-shards/--shard-index or torchrun); a rerun resumes; the last shard to finish writes "
                    "OUT. Unreadable images are reported and counted, never replaced.")
    parser.add_argument("input", metavar="INPUT", nargs="?", help="data file, CSV or folder of images")
    parser.add_argument("output", metavar="OUT", nargs="?", help="output Parquet file (written atomically)")
    parser.add_argument("--model", metavar="PATH", help="checkpoint folder or hub name of a Chameleon/Anole, "
                                                        "Emu3 or Janus model")
    parser.add_argument("--format", metavar="FMT", help="INPUT's format: canonical (default for files), csv, "
                                                        "folder, or any medtune data format")
    parser.add_argument("--image-root", metavar="DIR", help="folder image paths are relative to")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per encoder call (default %(default)s)")
    parser.add_argument("--num-shards", type=int, default=1, metavar="N", help="processes sharing the work (default %(default)s; under torchrun: WORLD_SIZE)")
    parser.add_argument("--shard-index", type=int, default=0, metavar="I", help="this process's shard, 0..N-1 (default %(default)s; under torchrun: RANK)")
    parser.add_argument("--chunk-rows", type=int, default=1024, metavar="N",
                        help="rows per flushed part file: what a kill can lose (default %(default)s)")
    parser.add_argument("--device", default=None, help="where the VQ runs (default: this rank's GPU, else cpu)")
    parser.add_argument("--medmax", action="store_true", help="write MedMax's columns: img_path, img_tokens")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    parser.add_argument("--merge", action="store_true",
                        help="only merge finished shards into OUT: medtune tokenize-images --merge OUT")
    parser.set_defaults(func=run_tokenize_images)


def run_tokenize_images(args: argparse.Namespace) -> int:
    from medtune.errors import UserError
    from medtune.models import tokenize_images as tokenize

    if args.merge:
        out = args.output or args.input
        if out is None:
            raise UserError("--merge needs OUT")
        merged = tokenize.merge_parts(out, medmax=args.medmax)
        print(f"{merged.summary()}\nwrote {merged.written} rows -> {merged.out}")
        return 0
    if args.input is None or args.output is None or args.model is None:
        raise UserError("tokenize-images needs INPUT, OUT and --model")
    tokenize.check_output(args.output)
    from medtune.models.vq import image_tokenizer

    check_model_path(args.model)
    try:
        tokenizer = image_tokenizer(args.model, device=args.device or process_device())
    except UserError:
        raise
    except OSError as error:  # a hub name that is not in the cache offline, a broken weight file
        raise UserError(f"cannot load an image tokenizer from {args.model}: {' '.join(str(error).split())}") from error
    result = tokenize.tokenize_images(
        args.input, args.output, tokenizer, fmt=args.format, image_root=args.image_root,
        batch_size=args.batch_size, num_shards=args.num_shards, shard_index=args.shard_index, strict=args.strict,
        medmax=args.medmax, chunk_rows=args.chunk_rows)
    for line in result.input_tally.details() + result.input_tally.notes:
        print(f"  input: {line}")
    shard = f"shard {result.shard_index} of {result.num_shards}: " if result.num_shards > 1 else ""
    print(f"{shard}{result.summary()}; {result.encoded} distinct images encoded, {result.resumed} rows kept "
          "from an earlier run")
    if result.merged is None:
        print(result.waiting)
        return 0
    if result.num_shards > 1:
        print(f"all shards: {result.merged.summary()}")
    print(f"wrote {result.merged.written} rows -> {result.merged.out}")
    return 0
