"""Command-line verbs of the serving stage: ``medtune chat``, ``medtune serve`` and ``medtune web``.

Each verb loads the model inside its function (torch, FastAPI, Gradio are imported there), so registering the
verbs costs nothing for the other commands.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from medtune.models.cli import check_model_path

# Folder names medtune gives every checkpoint it writes (OUT/stage-N-NAME/model, checkpoint-N, adapter, the demo's
# DIR/model): they say nothing about which model it is, so a checkpoint's name is the first folder above them.
GENERIC_FOLDER = re.compile(r"(model|adapter|base-model|checkpoint-\d+)")


def register(subparsers) -> None:
    _register_chat(subparsers)
    _register_serve(subparsers)
    _register_web(subparsers)


def checkpoint_name(model: str) -> str:
    """What a person calls the model at ``model``: its folder's name, or the first folder above a generic one
    (``runs/demo/model`` is "demo"); for a hub name, its last part (``llava-hf/llava-1.5-7b-hf``)."""
    local = Path(model).expanduser()
    if not local.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith("."):
        return model.rsplit("/", 1)[-1]   # a hub name: ORG/NAME
    path = Path(os.path.abspath(local))   # not resolved: a symlink's own name counts
    for folder in (path, *path.parents):
        if folder.name and not GENERIC_FOLDER.fullmatch(folder.name):
            return folder.name
    return path.name or "model"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _register_chat(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="talk to a model in the terminal (streamed answers)",
                                   description="An interactive conversation with a model. Type /help for "
                                               "commands (load an image, reset, change sampling settings).")
    _add_model(parser)
    parser.add_argument("--image", help="an image to talk about: PNG/JPEG, DICOM or NIfTI")
    parser.add_argument("--window", help="window preset for DICOM images (lung, bone, brain, ...)")
    parser.add_argument("--slice", type=int, help="slice of a NIfTI volume (default: the middle one)")
    parser.add_argument("--max-tokens", type=_positive_int, default=256,
                        help="longest answer in tokens (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 is greedy, the same answer every time (default %(default)s; "
                             "the API's default is 1, as OpenAI's)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling: sample from the smallest set of tokens whose probabilities add up "
                             "to P, when temperature > 0 (default %(default)s: every token)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    parser.add_argument("--modalities", default="text",
                        help="what answers may hold: text, image, or text,image (images need a model that writes "
                             "image tokens, e.g. a MedMax checkpoint with its image decoder) (default %(default)s)")
    parser.add_argument("--image-guidance", default=None, metavar="TEXT,IMAGE",
                        help="classifier-free guidance scales for image answers, on the text and on the images "
                             "(default: Chameleon's 3,1.2; 1,1 turns guidance off)")
    parser.add_argument("--image-temperature", type=float, default=None,
                        help="sampling temperature of image codes; 0 takes the most likely code (default: "
                             "Chameleon's 0.7)")
    parser.add_argument("--image-top-p", type=float, default=None,
                        help="nucleus of image codes (default: Chameleon's 0.9)")
    parser.add_argument("--image-dir", type=Path, default=Path("medtune-chat-images"),
                        help="where images in answers are saved (default: ./medtune-chat-images)")
    parser.set_defaults(func=_run_chat)


def _run_chat(args) -> int:
    from medtune.serve.chat import run_chat

    check_model_path(args.model)
    return run_chat(args)


def _add_model(parser, port: int | None = None) -> None:
    """The MODEL argument every serving verb takes, and for servers the loopback address they bind."""
    parser.add_argument("model", help="a medtune checkpoint folder or a local Hugging Face VLM")
    if port is not None:
        parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
        parser.add_argument("--port", type=int, default=port, help="port to listen on (default %(default)s)")


def _register_serve(subparsers) -> None:
    # api.py imports no web framework at module level; its defaults are the documented ones
    from medtune.serve.api import (DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_QUEUE, DEFAULT_MAX_REQUEST_PIXELS,
                                   DEFAULT_MAX_TOKENS, DEFAULT_MAX_TOKENS_LIMIT)

    parser = subparsers.add_parser("serve", help="serve a model as an OpenAI-compatible HTTP API",
                                   description="GET /v1/models, POST /v1/chat/completions (streaming with "
                                               "stream: true), GET /health. Binds to loopback by default.")
    _add_model(parser, port=8000)
    parser.add_argument("--model-name", help="the model id clients send (default: the checkpoint's name: its "
                                             "folder's, or the run folder's for RUN/model)")
    parser.add_argument("--api-key", default=os.environ.get("MEDTUNE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $MEDTUNE_API_KEY)")
    parser.add_argument("--allowed-image-root", type=Path,
                        help="accept image paths under this folder (default: data URIs only)")
    parser.add_argument("--max-tokens-limit", type=_positive_int, default=DEFAULT_MAX_TOKENS_LIMIT,
                        help="largest max_tokens a request may ask for (default %(default)s)")
    parser.add_argument("--default-max-tokens", type=_positive_int, default=None,
                        help=f"max_tokens when a request does not say (default: {DEFAULT_MAX_TOKENS}, "
                             "or the limit if lower)")
    parser.add_argument("--max-image-bytes", type=_positive_int, default=DEFAULT_MAX_IMAGE_BYTES,
                        help="largest image file accepted, in bytes (default %(default)s: 20 MiB); a request body "
                             "may hold four such images in base64 and 4 MiB more, and is refused with 413 past that")
    parser.add_argument("--max-pixels", type=_positive_int, default=None,
                        help="largest image accepted, in pixels (default: the image loader's guard, 50,000,000)")
    parser.add_argument("--max-request-pixels", type=_positive_int, default=DEFAULT_MAX_REQUEST_PIXELS,
                        help="pixels all images of one request may have together, checked from their headers "
                             "before decoding; a NIfTI volume counts every voxel (default %(default)s)")
    parser.add_argument("--max-batch-size", type=_positive_int, default=8,
                        help="requests with equal settings generated together (default %(default)s)")
    parser.add_argument("--max-queue", type=_positive_int, default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait for the model; past it a request gets 503 with Retry-After "
                             f"(default: {DEFAULT_MAX_QUEUE})")
    parser.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    from medtune.errors import UserError
    from medtune.serve.api import DEFAULT_MAX_TOKENS, serve

    check_model_path(args.model)
    if args.allowed_image_root is not None and not args.allowed_image_root.is_dir():
        raise UserError(f"--allowed-image-root {args.allowed_image_root} is not a folder")
    if args.default_max_tokens is None:
        args.default_max_tokens = min(DEFAULT_MAX_TOKENS, args.max_tokens_limit)
    if args.default_max_tokens > args.max_tokens_limit:
        raise UserError(f"--default-max-tokens {args.default_max_tokens} is over --max-tokens-limit "
                        f"{args.max_tokens_limit}")
    config = dict(model_id=args.model_name or checkpoint_name(args.model), api_key=args.api_key,
                  allowed_image_root=args.allowed_image_root.resolve() if args.allowed_image_root else None,
                  max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                  max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels,
                  max_request_pixels=args.max_request_pixels,
                  max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    serve(args.model, host=args.host, port=args.port, config_overrides=config)
    return 0


def _register_web(subparsers) -> None:
    parser = subparsers.add_parser("web", help="a browser demo (Gradio): upload an image and chat",
                                   description="Upload a PNG/JPEG/DICOM image, pick a window preset for DICOM, "
                                               "chat, regenerate, clear; shows the image as the model sees it.")
    _add_model(parser, port=7860)
    parser.set_defaults(func=_run_web)


def _run_web(args) -> int:
    from medtune.serve.web import run_web

    check_model_path(args.model)
    args.model_name = checkpoint_name(args.model)   # the page's title
    return run_web(args)
