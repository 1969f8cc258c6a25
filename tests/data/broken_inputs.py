"""Generators for deliberately broken inputs.

``make_broken_dataset`` writes one canonical JSONL whose every line exercises one failure, plus the images it
names, and returns what each line should be reported as. The committed folder tests/data/broken/ is its output
(``python tests/data/broken_inputs.py tests/data/broken``), kept so anyone can run
``medtune data check tests/data/broken/broken.jsonl`` by hand; every file is tiny (the "oversized" PNG is a
65-byte header claiming 100000 x 100000 pixels). The other helpers build DICOM/PNG/JPEG files for unit tests.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PATIENT_NAME = "Doe^Jane Quixotic"
PATIENT_ID = "PID-99887766"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png_bytes(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG signature and header claiming ``width x height`` RGB pixels, with no real pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b""))
            + png_chunk(b"IEND", b""))


def write_rgb_png(path: Path, size=(32, 24), seed: int = 0, text: dict | None = None) -> Path:
    from PIL import PngImagePlugin
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    Image.fromarray(pixels, "RGB").save(path, pnginfo=info)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """A real JPEG cut after 60% of its bytes: the header parses, decoding fails."""
    pixels = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = path.with_suffix(".full.jpg")
    Image.fromarray(pixels, "RGB").save(buffer, quality=90)
    data = buffer.read_bytes()
    buffer.unlink()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def write_dicom(path: Path, pixels: np.ndarray, *, patient_name: str = PATIENT_NAME, photometric="MONOCHROME2",
                slope: float | None = None, intercept: float | None = None, window=None, frames: int = 1,
                truncate_pixels: bool = False, modality="CT", body_part="CHEST", view: str | None = None,
                sop_class: str | None = None, burned_in: str | None = None) -> Path:
    """A small uncompressed DICOM with a patient name and ID (the identifiers that must never leak).

    A CT image by default; ``sop_class`` (a UID) and ``burned_in`` (BurnedInAnnotation, YES/NO) make the kinds
    that medtune refuses by default because their pixels may show patient text.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class or CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[path.name])  # reproducible files
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, PATIENT_ID, "19700101"
    ds.InstitutionName = "St Example Hospital"
    ds.Modality, ds.BodyPartExamined = modality, body_part
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    if view:
        ds.ViewPosition = view
    pixels = np.asarray(pixels)
    ds.Rows, ds.Columns = pixels.shape[-2], pixels.shape[-1]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if pixels.min() < 0 else 0
    dtype = "<i2" if ds.PixelRepresentation else "<u2"
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    data = pixels.astype(dtype).tobytes()
    ds.PixelData = data[: len(data) // 2] if truncate_pixels else data
    ds.save_as(path, enforce_file_format=True)
    return path


def make_broken_dataset(root: Path) -> tuple[Path, dict[int, str]]:
    """Write broken images and a canonical JSONL under ``root``; return (jsonl path, {line: expected message})."""
    images = root / "images"
    images.mkdir(parents=True)
    write_rgb_png(images / "good.png")
    write_truncated_jpeg(images / "truncated.jpg")
    (images / "empty.png").write_bytes(b"")
    (images / "notes.png").write_text("this is a text file, not a PNG\n")
    (images / "huge.png").write_bytes(bomb_png_bytes())
    write_dicom(images / "patient.dcm", np.arange(64 * 64).reshape(64, 64) % 4096)
    write_dicom(images / "broken_patient.dcm", np.arange(64 * 64).reshape(64, 64) % 4096, truncate_pixels=True)

    def record(sample_id, image=None, question="What is shown?", answer="a lung", **meta):
        content = ([{"type": "image", "image": {"path": image}}] if image else []) + [{"type": "text",
                                                                                      "text": question}]
        return json.dumps({"id": sample_id, "messages": [{"role": "user", "content": content},
                                                          {"role": "assistant", "content": answer}],
                           "meta": meta})

    lines = [
        (record("ok-png", "images/good.png"), None),
        (record("ok-dicom", "images/patient.dcm"), None),
        (record("trunc", "images/truncated.jpg"), "truncated or corrupt image data"),
        (record("empty", "images/empty.png"), "empty file (0 bytes)"),
        (record("text", "images/notes.png"), "not an image file"),
        (record("bomb", "images/huge.png"), "100000x100000 = 10,000,000,000 pixels, over the limit"),
        (record("escape", "../../etc/passwd"), "outside the image root"),
        ('{"id": "cut", "messages": [', "not valid JSON"),
        (record("placeholder", "images/good.png", question="<image>\n<image>\nCompare."),
         "2 '<image>' placeholder(s) in the text but 1 image part(s)"),
        (record("bad-dicom", "images/broken_patient.dcm"), "DICOM pixel data cannot be decoded"),
        (record("missing", "images/nowhere.png"), "file not found"),
    ]
    path = root / "broken.jsonl"
    path.write_text("".join(text + "\n" for text, _ in lines))
    return path, {number: message for number, (_, message) in enumerate(lines, start=1) if message}


def main(argv: list[str] | None = None) -> None:
    """Write the broken inputs into a folder for manual runs: ``python tests/data/broken_inputs.py OUT``."""
    import sys

    out = Path((argv if argv is not None else sys.argv[1:])[0])
    path, expected = make_broken_dataset(out)
    (out / "expected.json").write_text(json.dumps({str(k): v for k, v in expected.items()}, indent=2) + "\n")
    print(f"wrote {path}; try: medtune data check {path}")
    for line, message in expected.items():
        print(f"  line {line}: expect {message!r}")


if __name__ == "__main__":
    main()
