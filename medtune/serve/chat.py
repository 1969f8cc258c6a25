"""``medtune chat``: a conversation with a model in the terminal, answers streamed token by token.

Design choices:

* :class:`ChatSession` holds the conversation, the current image and the sampling settings, and knows nothing
  about terminals; :func:`chat_loop` reads lines from any text stream and writes to any other, so the real
  command is tested by feeding its stdin (tests/serve/test_chat.py).
* The current image goes with the next question; loading another image starts a new conversation, because
  the LLaVA-style models medtune trains see one image per conversation.
* Images go through ``medtune.data.images.load_image``: PNG/JPEG, DICOM (with a window preset) and NIfTI
  (with a slice), with the same decompression-bomb guard as everywhere else.
* Every answer line starts with ``assistant: `` and ends with a newline, so output stays parseable when
  stdin is not a terminal (no prompts are printed then).
* Chat starts greedy (temperature 0), where ``medtune serve``'s API samples at temperature 1 as OpenAI's does;
  the banner says which decoding is on (:func:`decoding_note`), so a different answer from the API is no riddle.
* An answer that holds images (a model that writes image tokens, with ``modalities`` allowing images) gets them
  saved as PNG files under ``image_dir``, named by the answer's number and the image's content hash (never by an
  input file's name), and their paths printed after the text. The conversation keeps the answer's text.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

from medtune.models.generation import GenerationSettings, ImageSampling

HELP = """commands:
  /image PATH           talk about another image (PNG/JPEG, DICOM, NIfTI); starts a new conversation
  /add-image PATH       add an image to this conversation (a second view, a prior study): it goes with your
                        next message, after the images before it
  /set NAME VALUE       change a setting: temperature, top_p, max_tokens, seed, modalities, window, slice;
                        for image answers: image_guidance TEXT,IMAGE, image_temperature, image_top_p
  /settings             show the current settings
  /reset                forget the conversation (its images stay)
  /help                 this text
  /quit                 leave (also Ctrl-D)
anything else is sent to the model as your next message"""

SAMPLING_SETTINGS = {"temperature": float, "top_p": float, "max_tokens": int, "seed": int}
IMAGE_SETTINGS = ("image_guidance", "image_temperature", "image_top_p")


class ChatCommandError(ValueError):
    """A command the user typed cannot be carried out; shown as one line, the session goes on."""


@dataclass
class ChatSession:
    """A conversation with one model: messages so far, the current image, and sampling settings."""

    generator: Any
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    window: str | None = None
    slice: int | None = None
    messages: list[dict] = field(default_factory=list)
    images: list = field(default_factory=list)   # the images sent so far, in the order the messages hold them
    named: list = field(default_factory=list)    # (name, PIL image) of every image of this conversation
    pending: list = field(default_factory=list)  # images not sent yet: they go with the next message
    image_dir: Path = Path("medtune-chat-images")
    answers: int = 0   # answers given so far (names saved images)

    def load_image(self, path: str) -> None:
        """Make ``path`` the conversation's only image and start a new conversation about it."""
        self.named = [(path, load_image_file(path, window=self.window, slice=self.slice))]
        self.reset()

    def add_image(self, path: str) -> None:
        """Add ``path`` to the conversation: it goes with the next message, after the images before it."""
        image = load_image_file(path, window=self.window, slice=self.slice)
        self.named.append((path, image))
        self.pending.append(image)

    def __post_init__(self) -> None:
        self.reset()   # the conversation's images go with the first message

    def reset(self) -> None:
        """Forget the messages; the conversation's images go with the next message again."""
        self.messages, self.images = [], []
        self.pending = [image for _, image in self.named]

    def ask(self, text: str):
        """Add the user's message (with the images not sent yet) and return the stream of the answer; the answer
        is recorded at its end."""
        content = [{"type": "image"} for _ in self.pending] + [{"type": "text", "text": text}]
        self.images, self.pending = [*self.images, *self.pending], []
        self.messages.append({"role": "user", "content": content})
        return self.generator.stream(self.messages, self.images, self.settings)

    def withdraw(self) -> int:
        """Take back the last message, which the model could not answer (e.g. more images than it takes), with the
        images it brought: they leave the conversation, so the next message can be answered. Their count."""
        message = self.messages.pop()
        brought = sum(1 for part in message["content"] if part["type"] == "image")
        if brought:
            kept = len(self.images) - brought
            self.images = self.images[:kept]
            self.named = self.named[:kept] + self.named[kept + brought:]
        return brought

    def record_answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def save_images(self, images: list) -> list[Path]:
        """Write an answer's images as PNG files (named by answer number and content hash); their paths."""
        import hashlib
        import io

        self.answers += 1
        paths = []
        for index, image in enumerate(images, 1):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            digest = hashlib.sha256(buffer.getvalue()).hexdigest()[:12]
            path = self.image_dir / f"answer-{self.answers}-{index}-{digest}.png"
            self.image_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buffer.getvalue())
            paths.append(path)
        return paths

    def set(self, name: str, value: str) -> None:
        """``/set NAME VALUE``: a sampling setting, or the window/slice used for the next /image."""
        if name == "window":
            self.window = _check_window(None if value.lower() == "none" else value)
        elif name == "modalities":
            try:
                self.settings = dataclasses.replace(self.settings, modalities=parse_modalities(value))
            except ValueError as error:
                raise ChatCommandError(str(error)) from None
        elif name == "slice":
            self.slice = None if value.lower() == "none" else _parse(int, name, value)
        elif name in IMAGE_SETTINGS:
            try:
                image = image_sampling(self.settings.image, **{name: value})
            except ValueError as error:
                raise ChatCommandError(str(error)) from None
            self.settings = dataclasses.replace(self.settings, image=image)
        elif name in SAMPLING_SETTINGS:
            parsed = None if name == "seed" and value.lower() == "none" else _parse(SAMPLING_SETTINGS[name], name,
                                                                                     value)
            key = "max_new_tokens" if name == "max_tokens" else name
            try:
                self.settings = dataclasses.replace(self.settings, **{key: parsed})
            except ValueError as error:
                raise ChatCommandError(str(error)) from None
        else:
            known = ", ".join([*SAMPLING_SETTINGS, "modalities", "window", "slice", *IMAGE_SETTINGS])
            raise ChatCommandError(f"unknown setting {name!r} (settings: {known})")

    def describe(self) -> str:
        s = self.settings
        described = (f"temperature={s.temperature} top_p={s.top_p} max_tokens={s.max_new_tokens} seed={s.seed} "
                     f"modalities={','.join(s.modalities)} window={self.window} slice={self.slice} "
                     f"image={','.join(name for name, _ in self.named) or None}")
        if "image" in s.modalities:
            i = s.image
            described += (f" image_guidance={i.guidance_text:g},{i.guidance_image:g} "
                          f"image_temperature={i.temperature:g} image_top_p={i.top_p:g}")
        return described


def decoding_note(settings: GenerationSettings) -> str:
    """The banner's second line: how answers are decoded, and the command that changes it."""
    images = ""
    if "image" in settings.modalities and settings.image.temperature > 0:
        images = (f"; image answers are sampled at temperature {settings.image.temperature:g} (Chameleon's), so "
                  "they vary: /set image_temperature 0 for the most likely codes")
    if settings.greedy:
        return ("greedy decoding (temperature 0): the same question gets the same answer, where the API samples "
                "at 1 unless asked; /set temperature 0.7 to sample" + images)
    seed = f", seed {settings.seed}" if settings.seed is not None else ", no seed"
    return (f"sampling at temperature {settings.temperature:g}, top_p {settings.top_p:g}{seed}: answers vary; "
            "/set temperature 0 for greedy decoding" + images)


def image_sampling(current: ImageSampling, *, image_guidance: str | None = None,
                   image_temperature: str | float | None = None, image_top_p: str | float | None = None) -> ImageSampling:
    """``current`` with the settings given as text (``image_guidance`` is ``TEXT,IMAGE``, e.g. ``3,1.2``)."""
    changes = {}
    if image_guidance is not None:
        scales = str(image_guidance).split(",")
        try:
            changes["guidance_text"], changes["guidance_image"] = (float(scale) for scale in scales)
        except ValueError:
            raise ValueError(f"image_guidance must be two numbers, TEXT,IMAGE (Chameleon's: 3,1.2), got "
                             f"{image_guidance!r}") from None
    for key, value in (("temperature", image_temperature), ("top_p", image_top_p)):
        if value is not None:
            changes[key] = _parse(float, f"image_{key}", value) if isinstance(value, str) else value
    return dataclasses.replace(current, **changes)


def parse_modalities(text: str) -> tuple[str, ...]:
    """``text``, ``image`` or ``text,image`` as GenerationSettings modalities."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parse(kind: type, name: str, value: str):
    try:
        return kind(value)
    except ValueError:
        raise ChatCommandError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") \
            from None


def _check_window(window: str | None) -> str | None:
    from medtune.data.images import WINDOW_PRESETS

    if window is not None and window not in WINDOW_PRESETS:
        raise ChatCommandError(f"unknown window preset {window!r} (presets: {', '.join(WINDOW_PRESETS)})")
    return window


def load_image_file(path: str, *, window: str | None = None, slice: int | None = None):
    """A PIL image from a PNG/JPEG/DICOM/NIfTI file given on the command line."""
    from medtune.data.images import load_image
    from medtune.data.schema import ImageRef

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    _check_window(window)
    # a clinician's own image, shown to the model and written nowhere: burned-in text is no reason to refuse it
    return load_image(ImageRef(path=file.name, slice=slice), file.resolve().parent, window=window,
                      allow_burned_in=True)


def handle_command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Carry out a ``/command``; returns False when the user wants to leave."""
    name, _, rest = line[1:].strip().partition(" ")
    rest = rest.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name == "help":
        print(HELP, file=out)
    elif name == "reset":
        session.reset()
        print("conversation reset", file=out)
    elif name == "settings":
        print(session.describe(), file=out)
    elif name == "image":
        if not rest:
            raise ChatCommandError("usage: /image PATH")
        session.load_image(rest)
        print(f"image: {rest} (new conversation)", file=out)
    elif name == "add-image":
        if not rest:
            raise ChatCommandError("usage: /add-image PATH")
        session.add_image(rest)
        print(f"image {len(session.named)}: {rest} (sent with your next message)", file=out)
    elif name == "set":
        setting, _, value = rest.partition(" ")
        if not value.strip():
            raise ChatCommandError("usage: /set NAME VALUE, e.g. /set temperature 0.7")
        session.set(setting, value.strip())
        print(session.describe(), file=out)
    else:
        raise ChatCommandError(f"unknown command /{name} (type /help)")
    return True


def chat_loop(session: ChatSession, lines: Iterable[str], out: TextIO) -> None:
    """Read messages and commands from ``lines`` until /quit or the end; stream answers to ``out``."""
    from medtune.data.images import ImageError

    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.startswith("/"):
            try:
                if not handle_command(session, line, out):
                    return
            except (ChatCommandError, ImageError, FileNotFoundError) as error:
                print(f"error: {error}", file=out)
            out.flush()
            continue
        print("assistant: ", end="", file=out, flush=True)
        pieces = []
        try:
            stream = session.ask(line)
            for delta in stream:
                pieces.append(delta)
                print(delta, end="", file=out, flush=True)
        except ValueError as error:  # the model cannot take this conversation (e.g. too many images)
            dropped = session.withdraw()
            note = f" (its {dropped} image{'s' * (dropped > 1)} left the conversation)" if dropped else ""
            print(f"\nerror: {error}{note}", file=out, flush=True)
            continue
        print(file=out, flush=True)
        images = getattr(getattr(stream, "completion", None), "images", None) or []
        for path in session.save_images(images) if images else []:
            print(f"[image: {path}]", file=out, flush=True)
        session.record_answer("".join(pieces))


def _terminal_lines(prompt: str):
    """Lines typed at an interactive terminal (with line editing), until Ctrl-D."""
    try:
        import readline  # noqa: F401  (gives input() history and editing where available)
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def run_chat(args) -> int:
    """``medtune chat MODEL [--image FILE] [--window PRESET] [--slice N]``."""
    from medtune.errors import UserError
    from medtune.models.build import load_vlm
    from medtune.models.generation import Generator

    try:
        image = image_sampling(ImageSampling(), image_guidance=args.image_guidance,
                               image_temperature=args.image_temperature, image_top_p=args.image_top_p)
        settings = GenerationSettings(max_new_tokens=args.max_tokens, temperature=args.temperature,
                                      top_p=args.top_p, seed=args.seed, modalities=parse_modalities(args.modalities),
                                      image=image)
        _check_window(args.window)
    except ValueError as error:
        raise UserError(str(error)) from None
    # the image first: a typo in its path should not cost a model load
    image = load_image_file(args.image, window=args.window, slice=args.slice) if args.image else None
    vlm = load_vlm(args.model)
    try:
        vlm.generation_kwargs(settings)   # a model that cannot write images says so now, not at the first answer
    except ValueError as error:
        raise UserError(f"--modalities {args.modalities}: {error}") from None
    session = ChatSession(Generator(vlm), settings, window=args.window, slice=args.slice,
                          named=[(args.image, image)] if image is not None else [], image_dir=args.image_dir)
    interactive = sys.stdin.isatty()
    print(f"medtune chat: {args.model}" + (f" with image {args.image}" if args.image else "")
          + ". Type /help for commands, /quit to leave.", flush=True)
    print(decoding_note(settings), flush=True)
    lines = _terminal_lines("you> ") if interactive else sys.stdin
    chat_loop(session, lines, sys.stdout)
    return 0
