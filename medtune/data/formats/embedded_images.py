"""Images stored inside a benchmark file (VLMEvalKit's base64 TSV cells, the image structs of a Hugging Face
Parquet release), written out so a sample can refer to a file like every other sample does.

* The bytes go, **unchanged**, to ``<file stem>_images/`` beside the benchmark file: nothing is decoded or
  re-encoded here, so the picture the model sees is exactly the released one, and a malformed image costs
  nothing until a question needs it.
* A file is named by a hash of its content (plus the suffix its leading bytes say: ``.png``, ``.jpg`` ...), so the
  same picture is stored once however many rows hold it, and reading the file again writes nothing new.
* Pixels are decoded later, by :func:`medtune.data.images.load_image`, with the limits every image gets (the
  pixel-count guard runs before decoding). The only check here is on size: one image larger than
  :data:`MAX_IMAGE_BYTES` is refused for its row.
* The sample's reference is ``<file stem>_images/<name>``, relative to the benchmark file's folder, which is
  therefore the image root of every format that uses this store.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from medtune.data.jsonl import atomic_open
from medtune.data.schema import ImageRef

MAX_IMAGE_BYTES = 192 << 20   # one image; far above any benchmark image, far below memory trouble
_SUFFIXES = ((b"\x89PNG", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
             (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"), (b"RIFF", ".webp"))


class EmbeddedImages:
    """Writes a benchmark file's embedded images to ``<stem>_images/`` beside it, named by content."""

    def __init__(self, path: Path):
        self.folder_name = f"{Path(path).stem}_images"
        self.folder = Path(path).parent / self.folder_name

    def write(self, data: bytes) -> ImageRef:
        """The reference to ``data``'s file, written first when no earlier row stored the same bytes."""
        if not data:
            raise ValueError("embedded image has no bytes")
        if len(data) > MAX_IMAGE_BYTES:
            raise ValueError(f"embedded image of {len(data):,} bytes is over the limit of {MAX_IMAGE_BYTES:,}")
        suffix = next((s for magic, s in _SUFFIXES if data.startswith(magic)), ".img")
        name = hashlib.sha256(data).hexdigest()[:32] + suffix
        target = self.folder / name
        if not target.exists():
            try:
                self.folder.mkdir(exist_ok=True)
                with atomic_open(target, "wb") as handle:
                    handle.write(data)
            except OSError as error:
                raise ValueError(f"cannot write the extracted image to {self.folder} ({error.strerror}); copy the "
                                 "benchmark file to a folder you can write to") from None
        return ImageRef(f"{self.folder_name}/{name}")
