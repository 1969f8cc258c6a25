"""``medtune web``: a browser demo (Gradio Blocks) to upload a medical image and chat about it.

Design choices:

* The upload is a ``gr.File``, not a ``gr.Image``: the browser cannot decode DICOM, so the file goes to the
  server as bytes and ``medtune.data.images`` reads it (PNG/JPEG/DICOM/NIfTI, window preset for DICOM,
  decompression-bomb guard).
* Next to the upload the page shows the image *as the model sees it* (``vlm.model_view``): windowed, made
  square the way the model's kind does it and resized to its input size. What a clinician looks at is then
  exactly what the model got.
* The conversation lives in a per-browser-session ``gr.State`` in Generator form (OpenAI-style messages and
  the image); the Chatbot only displays it, as plain text (no Markdown), so answers read as generated.
* Answers stream through ``Generator.stream``; Gradio's queue runs one generation at a time per event, and
  the Generator's lock serialises the rest, so several open tabs share the model safely.
* SIGTERM or Ctrl-C stops the page within a second, as ``medtune serve`` stops (:mod:`medtune.serve.shutdown`),
  not after Gradio's five-second wait for open browser connections.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.models.generation import GenerationSettings
from medtune.serve.shutdown import run_until_signalled

AUTO_WINDOW = "auto (from the file)"
NO_IMAGE = "No image: the model answers from text alone."
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".nii", ".gz", ".bmp", ".tif", ".tiff", ".webp"]


@dataclass
class WebSession:
    """One browser tab's conversation: messages in Generator form plus the current image."""

    messages: list[dict] = field(default_factory=list)
    image: Any = None
    image_name: str | None = None
    answer_images: dict = field(default_factory=dict)
    """message index -> PNG files of the images that answer holds (models that write images)."""

    def images(self) -> list:
        has_image_part = any(isinstance(m["content"], list) and any(p.get("type") == "image" for p in m["content"])
                             for m in self.messages)
        return [self.image] if has_image_part else []


def read_upload(path: str, window: str | None):
    """A PIL image from an uploaded file; DICOM windowed with ``window`` (None: the file's own window)."""
    from medtune.data.images import image_from_bytes

    data = Path(path).read_bytes()
    return image_from_bytes(data, name=Path(path).name, window=window)


def chat_history(session: WebSession) -> list[dict]:
    """The Chatbot's value: text of each message (an image part is shown as a marker), and after an answer the
    images it holds."""
    history = []
    for index, message in enumerate(session.messages):
        content = message["content"]
        if isinstance(content, list):
            content = "\n".join(p["text"] if p["type"] == "text" else "[image]" for p in content)
        history.append({"role": message["role"], "content": content})
        for path in session.answer_images.get(index, ()):
            history.append({"role": "assistant", "content": {"path": str(path), "mime_type": "image/png"}})
    return history


class DemoHandlers:
    """What the page's events do; each returns the new session state and what the page shows."""

    def __init__(self, generator, image_dir=None):
        import tempfile

        self.generator = generator
        self.vlm = generator.vlm
        self.image_dir = Path(image_dir or tempfile.mkdtemp(prefix="medtune-web-images-"))
        try:   # whether this model can answer with images (a model that writes image tokens, with a decoder)
            self.vlm.generation_kwargs(GenerationSettings(modalities=("image",)))
            self.draws = True
        except ValueError:
            self.draws = False

    def on_image(self, file, window, session: WebSession):
        from medtune.data.images import ImageError

        session = WebSession()  # a new image (or window) starts a new conversation
        if file is None:
            return session, None, [], NO_IMAGE
        try:
            image = read_upload(file, None if window == AUTO_WINDOW else window)
        except (ImageError, OSError, ValueError) as error:
            return session, None, [], f"Could not read the image: {error}"
        session.image, session.image_name = image, Path(file).name
        status = (f"{session.image_name}: {image.width}×{image.height} px, shown as the model sees it "
                  f"({self.vlm.image_size} px).")
        return session, self.vlm.model_view(image), [], status

    def on_send(self, question, session: WebSession, temperature, top_p, max_tokens, seed, draw=False):
        if not question or not question.strip():
            yield "", session, chat_history(session)
            return
        content = [{"type": "text", "text": question.strip()}]
        if session.image is not None and not session.images():
            content.insert(0, {"type": "image"})
        session.messages.append({"role": "user", "content": content})
        for session, history in self._answer(session, _settings(temperature, top_p, max_tokens, seed, draw)):
            yield "", session, history

    def on_regenerate(self, session: WebSession, temperature, top_p, max_tokens, seed, draw=False):
        if session.messages and session.messages[-1]["role"] == "assistant":
            session.answer_images.pop(len(session.messages) - 1, None)
            session.messages.pop()
        if not session.messages:
            yield session, []
            return
        yield from self._answer(session, _settings(temperature, top_p, max_tokens, seed, draw))

    def on_clear(self, session: WebSession):
        session.messages, session.answer_images = [], {}
        return session, []

    def _answer(self, session: WebSession, settings: GenerationSettings):
        """Stream the assistant's reply into the chat; record it in the session when it is complete."""
        history = chat_history(session) + [{"role": "assistant", "content": ""}]
        pieces = []
        stream = self.generator.stream(session.messages, session.images(), settings)
        for delta in stream:
            pieces.append(delta)
            history[-1]["content"] = "".join(pieces)
            yield session, history
        images = getattr(stream.completion, "images", None) or []
        if images:
            session.answer_images[len(session.messages)] = [self._save(image) for image in images]
        session.messages.append({"role": "assistant", "content": "".join(pieces)})
        yield session, chat_history(session)

    def _save(self, image) -> Path:
        import uuid

        path = self.image_dir / f"{uuid.uuid4().hex}.png"
        image.save(path, format="PNG")
        return path


def _settings(temperature, top_p, max_tokens, seed, draw=False) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                              seed=None if seed in (None, "") else int(seed),
                              modalities=("image",) if draw else ("text",))


def build_app(generator, *, title: str = "medtune"):
    """The Gradio Blocks app for ``generator`` (a :class:`medtune.models.generation.Generator`)."""
    import gradio as gr

    from medtune.data.images import WINDOW_PRESETS

    handlers = DemoHandlers(generator)
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nUpload a PNG, JPEG or DICOM image and ask about it. "
                    "Research demo: not for clinical use.")
        session = gr.State(WebSession())
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image (PNG/JPEG/DICOM)", file_types=UPLOAD_TYPES, elem_id="upload")
                window = gr.Dropdown([AUTO_WINDOW, *WINDOW_PRESETS], value=AUTO_WINDOW,
                                     label="DICOM window preset", elem_id="window")
                # shown enlarged by the browser; the pixels are the model's (image_size x image_size)
                seen = gr.Image(label="What the model sees", interactive=False, type="pil", elem_id="model-view",
                                format="png", height=256)
                status = gr.Markdown(NO_IMAGE, elem_id="status")
                with gr.Accordion("Sampling", open=False):
                    sampling = [gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)"),
                                gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p"),
                                gr.Slider(1, 1024, value=128, step=1, label="max tokens"),
                                gr.Number(value=None, precision=0, label="seed (sampling only)")]
                # models that write image tokens can answer with an image; the others get no such switch
                sampling.append(gr.Checkbox(value=False, label="answer with an image", elem_id="draw",
                                            visible=handlers.draws))
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", render_markdown=False, height=420,
                                     feedback_options=None)
                question = gr.Textbox(label="Your question", placeholder="Ask about the image and press Enter",
                                      elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")

        # Every event that changes the conversation runs in one queue, one at a time, in the order the user
        # acted: an answer still streaming when Clear (or a new image) arrives would otherwise write its
        # session and reply back over the emptied conversation. One model serves every tab anyway.
        serial = {"concurrency_id": "conversation", "concurrency_limit": 1}
        for trigger in (upload.change, window.change):
            trigger(handlers.on_image, [upload, window, session], [session, seen, chatbot, status], **serial)
        answering = [trigger(handlers.on_send, [question, session, *sampling], [question, session, chatbot],
                             **serial) for trigger in (send.click, question.submit)]
        answering.append(regenerate.click(handlers.on_regenerate, [session, *sampling], [session, chatbot],
                                          **serial))
        clear.click(handlers.on_clear, [session], [session, chatbot], cancels=answering, **serial)
    return app


def run_web(args) -> int:
    """``medtune web MODEL [--host] [--port]``."""
    import logging

    from medtune.models.build import load_vlm
    from medtune.models.generation import Generator

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning("the web demo on %s has no login: anyone who can reach the port "
                                            "can use the model and upload images", args.host)
    generator = Generator(load_vlm(args.model))
    app = build_app(generator, title=f"medtune · {getattr(args, 'model_name', None) or Path(args.model).name}")
    # not blocking: the main thread waits for a signal below, where Gradio's own wait would take seconds to stop
    app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=False,
                                                  ssr_mode=False, show_error=True, quiet=True,
                                                  prevent_thread_lock=True)
    run_until_signalled(app.server, app.server.thread, "medtune web", ready=lambda: logging.getLogger(__name__).info(
        "web demo on http://%s:%d", args.host, args.port))
    return 0
