"""Tokenised datasets cached on disk as Arrow, so a second run (or a second stage) skips preprocessing.

Which models: those whose kind (:mod:`medtune.models.kinds`) has ``cache_settings``; what a kind encodes from
the text alone is cached, its images are decoded later (``VLM.inputs_from_tokens``).

What is cached: per usable sample its id, input_ids, labels, length, image references (JSON), image root and
the sample metadata the kind carries (JSON); and the run's Tally (read / written / skipped with reasons), so a cached run reports the same skips as the
cold one. Pixels are NOT cached: images are decoded when a row is read (:class:`CachedDataset`), as LLaVA
does, which keeps the cache small (a 336-px image is ~1.3 MB as float32 pixels, ~1 KB as tokens).

The cache key is a SHA-256 over everything that changes the rows:
  * the content of the data file(s) (not their names or times: a copied file hits, an edited one misses),
  * the tokenizer (its full tokenizer.json when fast, else vocabulary + special tokens) and chat template,
  * the kind and its cache settings (template name, image token and tokens per image, pad mode, image size ...),
  * max_length, truncation, and any ``extra`` settings the caller adds (image root, mixture seed, limit ...),
  * :data:`CACHE_FORMAT`, bumped whenever encoding changes.
Entries live in ``cache_dir/<key>/`` and are written to a temporary folder that is renamed into place only
when complete, so an interrupted run never leaves an entry a later run would trust.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from medtune.data.files import file_digest
from medtune.data.jsonl import RecordError, Tally, write_json
from medtune.data.schema import ImageRef
from medtune.progress import track

CACHE_FORMAT = "2"
TALLY_FILE = "tally.json"


# --------------------------------------------------------------------------------------------------------------
# Keys

def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of what decides a tokenizer's output: its model and normaliser, special tokens, chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    digest.update(json.dumps([special, tokenizer.chat_template, type(tokenizer).__name__]).encode())
    return digest.hexdigest()


def cache_key(data_files: Sequence[str | os.PathLike], vlm, *, max_length: int, truncation: str,
              extra: dict | None = None) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "data": [file_digest(path) for path in data_files],
        "tokenizer": tokenizer_digest(vlm.tokenizer),
        "kind": vlm.kind, "settings": vlm.cache_settings(),
        "max_length": max_length, "truncation": truncation, "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------------------------
# Building and reading

def encode_checked(sample, vlm, image_root, *, max_length: int, truncation: str,
                   decoded: set | None = None) -> dict[str, list[int]]:
    """Token columns of a sample, after decoding its images so a broken image is counted now.

    ``decoded`` (the image files one pass has already decoded, by :meth:`ImageMemo.file_key`) skips an image
    file decoded for an earlier sample: VQA-RAD's 3,064 questions ask about 315 images."""
    row = vlm.encode_tokens(sample, max_length=max_length, truncation=truncation, image_root=image_root)
    if decoded is None:
        vlm.check_images(sample.images, image_root)
        return row
    keys = [ImageMemo.file_key(ref, image_root) for ref in sample.images]
    vlm.check_images([ref for ref, key in zip(sample.images, keys) if key is None or key not in decoded],
                     image_root)
    decoded.update(key for key in keys if key is not None)
    return row


@dataclass
class CachedEncoding:
    """The encoded rows (an Arrow-backed ``datasets.Dataset``), the run's Tally, and where they came from."""

    rows: Any
    tally: Tally
    key: str
    path: Path
    from_cache: bool


def encode_with_cache(samples: Callable[[], Iterable[tuple[Any, Path]]], vlm, *,
                      data_files: Sequence[str | os.PathLike], cache_dir: str | os.PathLike, max_length: int,
                      truncation: str = "text", extra: dict | None = None, strict: bool = False,
                      encoder: Callable | None = None, progress: bool = False) -> CachedEncoding:
    """Encoded rows of ``samples()`` (``(sample, image_root)`` pairs), from the cache when the key matches.

    ``samples`` is called only on a cache miss. ``encoder(sample, vlm, image_root, max_length=, truncation=)``
    defaults to :func:`encode_checked` (each image file decoded once per pass); a SkipSample it raises is
    counted in the Tally (raised when strict).
    """
    import datasets

    if vlm.cache_settings() is None:
        raise ValueError(f"the encoded samples of a {vlm.kind} model are not cacheable (they depend on the images)")
    key = cache_key(data_files, vlm, max_length=max_length, truncation=truncation, extra=extra)
    path = Path(cache_dir) / key
    if (path / TALLY_FILE).is_file():
        return CachedEncoding(datasets.load_from_disk(str(path)), _read_tally(path / TALLY_FILE), key, path, True)
    tally = Tally()
    columns = _encode_all(samples(), vlm, encoder or functools.partial(encode_checked, decoded=set()),
                          max_length=max_length,
                          truncation=truncation, strict=strict, tally=tally, data_files=data_files,
                          progress=progress)
    _write_entry(datasets.Dataset.from_dict(columns, features=_features()), tally, path)
    return CachedEncoding(datasets.load_from_disk(str(path)), tally, key, path, False)


def _features():
    import datasets

    tokens = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({"id": datasets.Value("string"), "input_ids": tokens, "labels": tokens,
                              "length": datasets.Value("int32"), "images": datasets.Value("string"),
                              "image_root": datasets.Value("string"), "metadata": datasets.Value("string")})


def _encode_all(pairs, vlm, encoder, *, max_length, truncation, strict, tally, data_files, progress) -> dict:
    from medtune.models.processing import SkipSample

    columns: dict[str, list] = {name: [] for name in _features()}
    pairs = list(pairs)   # a total for the display's ETA; the encoded columns are held in memory anyway
    for sample, image_root in track(pairs, total=len(pairs), desc="encoding", unit="samples", enabled=progress):
        tally.read += 1
        try:
            row = encoder(sample, vlm, image_root, max_length=max_length, truncation=truncation)
        except SkipSample as skip:
            where = str(data_files[0]) if len(data_files) == 1 else "data"
            if strict:
                raise RecordError(where, sample.id, str(skip)) from None
            tally.skip(skip.reason, f"{sample.id}: {skip}")
            continue
        columns["id"].append(sample.id)
        columns["input_ids"].append(row["input_ids"])
        columns["labels"].append(row["labels"])
        columns["length"].append(len(row["input_ids"]))
        columns["images"].append(json.dumps([ref.to_dict() for ref in sample.images]))
        columns["image_root"].append(str(image_root))
        columns["metadata"].append(json.dumps(row.get("sample_metadata")))
        tally.written += 1
    return columns


def _write_entry(dataset, tally: Tally, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _quietly(lambda: dataset.save_to_disk(str(staging), num_shards=1 if len(dataset) == 0 else None))
        write_json(staging / TALLY_FILE, {**tally.to_dict(), "examples": tally.examples})
        try:
            os.replace(staging, path)
        except OSError:
            if not (path / TALLY_FILE).is_file():  # another process finished the same entry first: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _quietly(action):
    """Run ``action`` without the datasets progress bar (our own tqdm already shows the encoding)."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        return action()
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def _read_tally(path: Path) -> Tally:
    import collections

    data = json.loads(path.read_text(encoding="utf-8"))
    return Tally(read=data["read"], written=data["written"], skipped=collections.Counter(data["skipped"]),
                 examples=data.get("examples", {}), notes=data.get("notes", []))


class CachedDataset:
    """Map-style dataset over cached rows: ``dataset[i]`` has token lists and decoded pixel values.

    Each distinct image is decoded and preprocessed once per process and kept (:class:`ImageMemo`, up to
    ``memo_bytes``; 0 turns it off): preprocessing is deterministic, so a later sample showing the same image
    gets bit-identical pixels without reading the file again (VQA-RAD: 315 images behind 3,064 samples).
    """

    def __init__(self, rows, vlm, *, allowed_roots=(), memo_bytes: int | None = None):
        self.rows, self.vlm, self.allowed_roots = rows, vlm, allowed_roots
        limit = DEFAULT_MEMO_BYTES if memo_bytes is None else memo_bytes
        self.memo = ImageMemo.for_preprocessing(vlm, limit) if limit > 0 else None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        return list(self.rows["length"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[int(index)]
        refs = [ImageRef.from_dict(ref) for ref in json.loads(row["images"])]
        tokens = {"input_ids": row["input_ids"], "labels": row["labels"],
                  "sample_metadata": json.loads(row["metadata"])}
        return self.vlm.inputs_from_tokens(tokens, refs, row["image_root"], allowed_roots=self.allowed_roots,
                                           memo=self.memo)


DEFAULT_MEMO_BYTES = 1 << 30
"""What one process keeps of preprocessed pixels (a 336-px image is ~1.3 MB as float32, a 64-px one 48 KB)."""


class ImageMemo:
    """Preprocessed pixels of each distinct image a process has decoded, up to ``limit_bytes``.

    Keyed by the image file (its resolved path under the image root, size and modification time, so an edited
    file is decoded again) and the frame / slice the reference names. Past the limit, new images are decoded
    as usual and not kept. With dataloader workers every worker keeps its own.
    :meth:`for_preprocessing` gives every dataset of a process with the same image preprocessing one memo (a
    recipe's stages and their evaluation sets decode each image once).
    """

    _shared: dict[tuple, "ImageMemo"] = {}

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.entries: dict[tuple, Any] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    @classmethod
    def for_preprocessing(cls, vlm, limit_bytes: int) -> "ImageMemo":
        """The process's memo for ``vlm``'s image preprocessing (its kind and image processor settings); a new
        one for a model without an image processor (its pixels may depend on more than those settings)."""
        processor = getattr(vlm, "image_processor", None)
        if processor is None:
            return cls(limit_bytes)
        key = (vlm.kind, type(processor).__qualname__, processor.to_json_string(), limit_bytes)
        return cls._shared.setdefault(key, cls(limit_bytes))

    def pixels(self, refs: Sequence[ImageRef], image_root, decode: Callable[[list], Any], *,
               allowed_roots: Sequence = ()):
        """The stacked pixels of ``refs`` (``decode(refs)`` gives them for a list of references, or None for
        none), decoding only the references not seen before."""
        if not refs:
            return decode([])
        import torch

        keys = [self.file_key(ref, image_root, allowed_roots) for ref in refs]
        kept = [self.entries.get(key) for key in keys]     # None: not seen yet, or unreadable now
        missing = [ref for ref, value in zip(refs, kept) if value is None]
        self.hits += len(refs) - len(missing)
        self.misses += len(missing)
        decoded = iter(decode(missing)) if missing else iter(())
        out = [next(decoded) if value is None else value for value in kept]
        for key, value, was_kept in zip(keys, out, kept):
            if was_kept is None:
                self._keep(key, value)
        return torch.stack(out)

    def _keep(self, key, value) -> None:
        size = value.numel() * value.element_size()
        if key is not None and key not in self.entries and self.bytes + size <= self.limit_bytes:
            self.entries[key] = value.clone()              # not a view into the batch tensor
            self.bytes += size

    @staticmethod
    def file_key(ref: ImageRef, image_root, allowed_roots: Sequence = ()) -> tuple | None:
        """The file's identity, or None when it cannot be read now (decoding then reports why)."""
        from medtune.data.images import resolve_image_path

        try:
            path = resolve_image_path(ref.path, image_root, allowed_roots)
            stat = path.stat()
        except (OSError, ValueError):                      # ImageError is a ValueError
            return None
        return (str(path), stat.st_size, stat.st_mtime_ns, ref.frame, ref.axis, ref.slice)
