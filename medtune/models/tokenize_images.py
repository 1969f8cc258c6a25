"""``medtune tokenize-images``: every image of a dataset becomes VQ codes in one Parquet file, batched, sharded
across processes and resumable after a kill.

Input: a canonical JSONL file (or any format ``medtune.data.formats`` reads), a CSV with an image path column
(``img_path`` as in MedMax, or ``image_path`` / ``image`` / ``path``; an ``id`` column if present, else the path
is the id) or a folder of images (ids are the paths relative to the folder). Each image reference of each sample
is one row, keyed by (sample id, image index), numbered by its position in the input.

Output (``OUT``, Parquet): ``id`` (string), ``image_index`` (int32), ``image`` (the path as referenced) and
``codes`` (list<int32>, ``codes_per_image`` raw code-book indices, row-major), one row per readable image, in
input order. ``--medmax`` writes MedMax's own layout instead: ``img_path`` and ``img_tokens`` (list<int64>),
one row per distinct image path. :func:`read_codes` reads both layouts, and MedMax's ``image_tokens`` field of
a MedMax (or canonical) JSONL file.

How it works, and why:

* **Sharding by sample id.** A sample belongs to shard ``blake2b(id) mod num_shards``: the same shard on every
  run and machine (Python's ``hash`` is salted per process), and all images of a sample in one shard. The shard
  comes from ``--num-shards/--shard-index`` or from torchrun's ``WORLD_SIZE``/``RANK``. Every shard reads the
  whole input (cheap next to encoding), so all shards agree on every row's position.
* **Resume by flushed chunks.** A shard appends its rows to ``OUT.parts/shard-I-of-N/`` as numbered Parquet
  chunk files of about ``chunk_rows`` rows. Each chunk is written under a temporary name, fsynced and renamed
  into place, so a kill loses at most the rows not yet flushed and a half-written chunk never carries a chunk's
  name (leftover temporaries are deleted when the shard starts again). A rerun reads the (id, image_index)
  keys of the finished chunks and encodes only the rest. Chunks of many rows rather than one per batch keep the
  file count small; Parquet rather than a JSON spool keeps codes as int32 and lets the merge read one column.
* **Never mixing two runs.** ``OUT.parts/manifest.json`` records a digest of the input's rows, the image root,
  the tokenizer's fingerprint (family, sizes, preprocessing, a digest of the VQ weights) and the shard count; a
  run that differs in any of them stops with an error instead of adding its codes to the others'.
* **Merge.** A shard that has worked through its rows writes ``done.json`` (its counts and the images it could
  not read; a shard that starts again deletes its own first, so no one merges under it). The last shard to
  finish (or ``--merge``) checks that every input row is in exactly one chunk or was reported unreadable, writes
  OUT in input order (a temporary file renamed into place) and deletes ``OUT.parts``. Only one shard merges: it
  takes ``merge.lock`` first (``--merge`` does not wait for it). The merge reads chunks through a small cache,
  so memory holds a few chunks, not the whole output.
* **Images.** Loaded through :func:`medtune.data.images.load_image` (paths kept inside the image root, size
  limits, DICOM/NIfTI) and preprocessed on a few threads that run ahead of the encoder. ``load_image`` hands
  over RGB with any alpha already composited onto white (PIL rounds where MedMax truncates: semi-transparent
  pixels may differ by one level from MedMax's own tokens; opaque and fully transparent ones agree). An image
  that several samples of a shard share is loaded and encoded once. An unreadable image is reported with its file, sample id, image
  index and reason, counted, and left out of the output (never replaced by a blank image); ``strict`` stops at
  the first. Every code is checked to lie in ``[0, codebook_size)``; a violation stops the run naming the image.
"""
from __future__ import annotations

import collections
import csv
import hashlib
import json
import os
import shutil
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medtune.data.images import ImageError, load_image
from medtune.data.jsonl import RecordError, Tally, atomic_open, write_json
from medtune.data import shards
from medtune.data.schema import ImageRef
from medtune.distributed import shard_from_env
from medtune.errors import UserError
from medtune.progress import note, progress_bar

FOLDER, CSV = "folder", "csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".dcm", ".dicom", ".nii",
                  ".nii.gz")
CSV_IMAGE_COLUMNS = ("img_path", "image_path", "image", "path")
DEFAULT_BATCH_SIZE = 16
DEFAULT_CHUNK_ROWS = 1024
MANIFEST_VERSION = 1
MERGE_ROW_GROUP = 4096

CODES_SCHEMA = pa.schema([("id", pa.string()), ("image_index", pa.int32()), ("image", pa.string()),
                          ("codes", pa.list_(pa.int32()))])
MEDMAX_SCHEMA = pa.schema([("img_path", pa.string()), ("img_tokens", pa.list_(pa.int64()))])
_CHUNK_SCHEMA = pa.schema([("position", pa.int64())] + list(CODES_SCHEMA))


# ------------------------------------------------------------------------------------------------------ input

@dataclass(frozen=True)
class ImageRow:
    """One image reference of one sample: the unit that is encoded and written."""

    position: int  # order in the input, over all shards
    id: str
    image_index: int
    ref: ImageRef


@dataclass(frozen=True)
class Source:
    """An input resolved to how it is read (``folder``, ``csv`` or a format name) and where its images are."""

    path: Path
    layout: str
    image_root: Path


def open_source(path: str | os.PathLike, fmt: str | None = None, image_root: str | os.PathLike | None = None
                ) -> Source:
    """Resolve INPUT: a folder, a ``.csv`` file, or a data file in ``fmt`` (default canonical)."""
    from medtune.data.formats import default_image_root, get_format

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    kind = fmt or (FOLDER if path.is_dir() else CSV if path.suffix.lower() == ".csv" else "canonical")
    if (kind == FOLDER) != path.is_dir():
        raise UserError(f"{path}: --format {kind} needs a {'folder' if kind == FOLDER else 'file'}")
    if kind == FOLDER:
        if image_root is not None:
            raise UserError("--image-root does not apply to a folder of images (its paths are relative to it)")
        return Source(path, kind, path)
    if kind == CSV:
        root = path.parent
    else:
        try:
            get_format(kind)
        except ValueError as error:
            raise UserError(f"{error}; or {CSV}, {FOLDER}") from None
        root = default_image_root(kind, path)
    return Source(path, kind, Path(image_root) if image_root else root)


def iter_rows(source: Source, *, tally: Tally, strict: bool = False) -> Iterator[ImageRow]:
    """Every image reference of every sample, in input order; a repeated sample id is skipped and counted."""
    seen: set[str] = set()
    position = 0
    for sample_id, refs in _iter_samples(source, tally, strict):
        if sample_id in seen:
            error = RecordError(source.path, sample_id, "duplicate sample id (its images are tokenized once)")
            if strict:
                raise error
            tally.skip("duplicate sample id", str(error))
            continue
        seen.add(sample_id)
        for index, ref in enumerate(refs):
            yield ImageRow(position, sample_id, index, ref)
            position += 1


def _iter_samples(source: Source, tally: Tally, strict: bool) -> Iterator[tuple[str, list[ImageRef]]]:
    if source.layout == FOLDER:
        for relative in _image_files(source.path):
            tally.read += 1
            yield relative, [ImageRef(relative)]
    elif source.layout == CSV:
        yield from _iter_csv(source.path, tally, strict)
    else:
        from medtune.data.formats import read_records

        for sample in read_records(source.layout, source.path, tally=tally, strict=strict):
            yield sample.id, sample.images


def _image_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the image files under ``folder``, sorted (hidden files left out)."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) \
                and not any(part.startswith(".") for part in relative.parts):
            found.append(relative.as_posix())
    return sorted(found)


def _iter_csv(path: Path, tally: Tally, strict: bool) -> Iterator[tuple[str, list[ImageRef]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        column = next((c for c in CSV_IMAGE_COLUMNS if c in (reader.fieldnames or ())), None)
        if column is None:
            raise UserError(f"{path}: no image path column (one of {', '.join(CSV_IMAGE_COLUMNS)}); "
                            f"columns: {', '.join(reader.fieldnames or [])}")
        for line, record in enumerate(reader, start=2):
            tally.read += 1
            image = (record.get(column) or "").strip()
            if not image:
                error = RecordError(path, line, f"empty {column}")
                if strict:
                    raise error
                tally.skip_error(error)
                continue
            yield (record.get("id") or "").strip() or image, [ImageRef(image)]


def _ref_key(ref: ImageRef) -> str:
    return json.dumps(ref.to_dict(), sort_keys=True)


def _scan(source: Source, num_shards: int, shard_index: int, tally: Tally, strict: bool
          ) -> tuple[list[ImageRow], int, str]:
    """This shard's rows, plus the row count and a digest of all rows (equal in every shard)."""
    digest = hashlib.sha256()
    mine, total = [], 0
    for row in iter_rows(source, tally=tally, strict=strict):
        digest.update(json.dumps([row.position, row.id, row.image_index, _ref_key(row.ref)]).encode() + b"\n")
        total += 1
        if shards.shard_of(row.id, num_shards) == shard_index:
            mine.append(row)
    return mine, total, digest.hexdigest()


# -------------------------------------------------------------------------------------------------- the parts

def parts_dir(out: str | os.PathLike) -> Path:
    """Where the shards of ``OUT`` keep their chunks until the merge: ``OUT.parts`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _shard_dir(parts: Path, num_shards: int, shard_index: int) -> Path:
    return parts / f"shard-{shard_index:05d}-of-{num_shards:05d}"


def _claim_manifest(parts: Path, manifest: dict) -> None:
    """Create ``manifest.json`` atomically, or check that the existing one describes the same run."""
    parts.mkdir(parents=True, exist_ok=True)
    target = parts / "manifest.json"
    temporary = parts / f".manifest.{os.getpid()}.json"
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    try:
        os.link(temporary, target)  # fails if another shard (or an earlier run) created it first
    except FileExistsError:
        existing = json.loads(target.read_text(encoding="utf-8"))
        differing = [key for key in manifest if existing.get(key) != manifest[key]]
        if differing:
            raise UserError(f"{parts} was started by a run with a different {', '.join(differing)}; use the same "
                            f"input, image root, model and shard count, or delete {parts} to start over") from None
    finally:
        temporary.unlink(missing_ok=True)


class ShardParts:
    """One shard's chunk files: which rows are finished, and appending more."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(".*.partial"):  # a chunk a kill interrupted: never trusted, rows redone
            leftover.unlink()
        self.done_path.unlink(missing_ok=True)  # working again: no other shard may merge until this one is done
        self.chunks = sorted(folder.glob("chunk-*.parquet"))
        self.next_number = 1 + max((int(p.stem.split("-")[1]) for p in self.chunks), default=-1)

    def finished(self) -> set[tuple[str, int]]:
        """(id, image_index) of every row in a finished chunk."""
        keys: set[tuple[str, int]] = set()
        for chunk in self.chunks:
            try:
                table = pq.read_table(chunk, columns=["id", "image_index"])
            except (pa.ArrowException, OSError) as error:  # chunks are renamed complete, so this is damage
                raise UserError(f"{chunk}: unreadable part file ({error}); delete it to encode its rows again"
                                ) from None
            keys.update(zip(table.column("id").to_pylist(), table.column("image_index").to_pylist()))
        return keys

    def append(self, rows: Sequence[ImageRow], codes: Sequence[np.ndarray]) -> Path:
        """Write one chunk atomically (temporary file, fsync, rename)."""
        path = self.folder / f"chunk-{self.next_number:06d}.parquet"
        with atomic_open(path, "wb") as handle:
            pq.write_table(_chunk_table(rows, codes), handle)
        self.next_number += 1
        self.chunks.append(path)
        return path

    @property
    def done_path(self) -> Path:
        return self.folder / "done.json"


def _codes_array(codes: Sequence[np.ndarray], value_type: pa.DataType) -> pa.Array:
    lengths = np.array([len(c) for c in codes], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(codes) if len(codes) else np.empty(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(value_type.to_pandas_dtype())))


def _chunk_table(rows: Sequence[ImageRow], codes: Sequence[np.ndarray]) -> pa.Table:
    return pa.Table.from_arrays([
        pa.array([r.position for r in rows], pa.int64()), pa.array([r.id for r in rows], pa.string()),
        pa.array([r.image_index for r in rows], pa.int32()), pa.array([r.ref.path for r in rows], pa.string()),
        _codes_array(codes, pa.int32())], schema=_CHUNK_SCHEMA)


# ------------------------------------------------------------------------------------------------- encoding

@dataclass
class ShardResult:
    """What one shard did: rows it owns, rows finished (now and by earlier runs), unreadable images."""

    shard_index: int
    num_shards: int
    read: int = 0
    tokenized: int = 0
    resumed: int = 0
    encoded: int = 0  # distinct images encoded by this run
    skipped: collections.Counter = field(default_factory=collections.Counter)
    failures: list[dict] = field(default_factory=list)
    input_tally: Tally = field(default_factory=Tally)
    merged: "MergeResult | None" = None
    waiting: str = ""  # why OUT was not written yet, when it was not

    def summary(self) -> str:
        return _summary_line(self.read, self.tokenized, self.skipped)


def _summary_line(read: int, tokenized: int, skipped: collections.Counter) -> str:
    line = f"{read} images read, {tokenized} tokenized, {sum(skipped.values())} skipped"
    if skipped:
        line += " (" + ", ".join(f"{n} {reason}" for reason, n in skipped.most_common()) + ")"
    return line


def _reason_head(reason: str) -> str:
    """The stable start of an ImageError reason ("truncated or corrupt image data (...)" -> its head)."""
    return reason.split(" (")[0].split(";")[0].strip() or reason[:60]


def _prefetched(items: Iterable, function: Callable, workers: int, ahead: int) -> Iterator[tuple[Any, Any]]:
    """``(item, function(item))`` in order, computed on ``workers`` threads at most ``ahead`` items early."""
    pool = ThreadPoolExecutor(max_workers=workers)
    queue: deque = deque()
    try:
        for item in items:
            queue.append((item, pool.submit(function, item)))
            if len(queue) >= ahead:
                first, future = queue.popleft()
                yield first, future.result()
        while queue:
            first, future = queue.popleft()
            yield first, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _ShardEncoder:
    """Encodes a shard's pending rows in batches and flushes them to its chunks."""

    def __init__(self, tokenizer, parts: ShardParts, result: ShardResult, image_root: Path, *, batch_size: int,
                 chunk_rows: int, strict: bool, progress):
        self.tokenizer, self.parts, self.result, self.image_root = tokenizer, parts, result, image_root
        self.batch_size, self.chunk_rows, self.strict, self.progress = batch_size, chunk_rows, strict, progress
        self.batch: list[tuple[list[ImageRow], Any]] = []  # (rows sharing one image, its pixels)
        self.rows: list[ImageRow] = []
        self.codes: list[np.ndarray] = []

    def load(self, ref: ImageRef):
        """Pixels (3, S, S) for one reference, or the ImageError that explains why not."""
        try:
            image = load_image(ref, self.image_root)
        except ImageError as error:
            return error
        return self.tokenizer.preprocess([image])[0]

    def run(self, pending: Sequence[ImageRow]) -> None:
        groups: OrderedDict[str, list[ImageRow]] = OrderedDict()
        for row in pending:
            groups.setdefault(_ref_key(row.ref), []).append(row)
        workers = max(1, min(8, os.cpu_count() or 1))
        loaded = _prefetched(groups.values(), lambda rows: self.load(rows[0].ref), workers, 2 * self.batch_size)
        try:
            for rows, pixels in loaded:
                if isinstance(pixels, ImageError):
                    self.fail(rows, pixels)
                    continue
                self.batch.append((rows, pixels))
                if len(self.batch) >= self.batch_size:
                    self.encode_batch()
            self.encode_batch()
        finally:
            loaded.close()  # stop the loader threads before anything else
            self.flush()  # what is encoded is kept, whatever stopped the run

    def fail(self, rows: list[ImageRow], error: ImageError) -> None:
        for row in rows:
            where = f"{error.file} (sample {row.id!r}, image {row.image_index})"
            if self.strict:
                raise ImageError(where, error.reason)
            self.result.skipped[_reason_head(error.reason)] += 1
            self.result.failures.append({"position": row.position, "id": row.id, "image_index": row.image_index,
                                         "image": row.ref.path, "reason": error.reason})
            note(f"unreadable image {where}: {error.reason}")
        self.progress.update(len(rows))

    def encode_batch(self) -> None:
        if not self.batch:
            return
        import torch

        from medtune.models.vq import CodeRangeError, check_codes

        batch, self.batch = self.batch, []
        codes = self.tokenizer.encode_pixels(torch.stack([pixels for _, pixels in batch]))
        self.result.encoded += len(batch)
        for (rows, _), image_codes in zip(batch, codes):
            try:
                check_codes(image_codes, self.tokenizer.codebook_size)
            except CodeRangeError as error:
                first = rows[0]
                raise CodeRangeError(f"{first.ref.path} (sample {first.id!r}, image {first.image_index}): "
                                     f"{error}") from None
            array = image_codes.numpy().astype(np.int32)
            self.rows.extend(rows)
            self.codes.extend([array] * len(rows))
            self.progress.update(len(rows))
        if len(self.rows) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.parts.append(self.rows, self.codes)
            self.result.tokenized += len(self.rows)
            self.rows, self.codes = [], []


def tokenize_images(input_path: str | os.PathLike, out: str | os.PathLike, tokenizer, *, fmt: str | None = None,
                    image_root: str | os.PathLike | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                    num_shards: int = 1, shard_index: int = 0, strict: bool = False, medmax: bool = False,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: bool | None = None) -> ShardResult:
    """Tokenize this shard's images of ``input_path`` into ``OUT.parts``; merge into ``out`` if it is the last.

    ``tokenizer``: a :class:`medtune.models.vq.ImageTokenizer`. ``progress``: False shows none; otherwise
    :func:`medtune.progress.progress_bar` (a bar on a terminal, plain lines in a log). Unreadable images are
    reported either way.
    """
    if batch_size < 1 or chunk_rows < 1:
        raise UserError("batch size and chunk rows must be at least 1")
    out, parts = Path(out), parts_dir(out)
    check_output(out)
    num_shards, shard_index = shard_from_env(num_shards, shard_index)
    source = open_source(input_path, fmt, image_root)
    result = ShardResult(shard_index, num_shards)
    rows, total, rows_digest = _scan(source, num_shards, shard_index, result.input_tally, strict)
    _claim_manifest(parts, {"version": MANIFEST_VERSION, "rows": total, "rows_digest": rows_digest,
                            "image_root": str(source.image_root.resolve()), "num_shards": num_shards,
                            "tokenizer": tokenizer.fingerprint()})
    shard = ShardParts(_shard_dir(parts, num_shards, shard_index))
    pending = shards.pending(rows, shard.finished(), key=lambda row: (row.id, row.image_index))
    result.read, result.resumed = len(rows), len(rows) - len(pending)
    result.tokenized = result.resumed
    label = f"shard {shard_index}/{num_shards}" if num_shards > 1 else "tokenizing"
    bar = progress_bar(len(pending), desc=label, unit="images", enabled=progress is not False)
    try:
        _ShardEncoder(tokenizer, shard, result, source.image_root, batch_size=batch_size, chunk_rows=chunk_rows,
                      strict=strict, progress=bar).run(pending)
    finally:
        bar.close()
    write_json(shard.done_path, {"shard_index": shard_index, "num_shards": num_shards, "read": result.read,
                                 "tokenized": result.tokenized, "skipped": dict(result.skipped),
                                 "failures": result.failures, "input": result.input_tally.to_dict()})
    _merge_if_last(out, parts, result, medmax)
    return result


def check_output(out: str | os.PathLike) -> None:
    """Refuse to start over a finished OUT (cheap: the CLI asks before it loads a model)."""
    out = Path(out)
    if out.exists() and not parts_dir(out).exists():
        raise UserError(f"{out} exists: delete it (or choose another OUT) to tokenize again")


def _merge_if_last(out: Path, parts: Path, result: ShardResult, medmax: bool) -> None:
    """Merge when every shard is done, in the one shard that takes ``merge.lock``."""
    waiting = [i for i in range(result.num_shards)
               if not (_shard_dir(parts, result.num_shards, i) / "done.json").exists()]
    if waiting:
        result.waiting = (f"{out} is written when shard{'s' * (len(waiting) > 1)} {', '.join(map(str, waiting))} "
                          f"of {result.num_shards} finish{'es' * (len(waiting) == 1)}")
        return
    try:
        os.close(os.open(parts / "merge.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        result.waiting = (f"another shard is writing {out} (if none is running, a merge was interrupted: "
                          f"run medtune tokenize-images --merge {out})")
        return
    result.merged = merge_parts(out, medmax=medmax)


# ---------------------------------------------------------------------------------------------------- merging

@dataclass
class MergeResult:
    out: Path
    read: int
    written: int
    tokenized: int
    skipped: collections.Counter
    input_tally: Tally

    def summary(self) -> str:
        return _summary_line(self.read, self.tokenized, self.skipped)


def merge_parts(out: str | os.PathLike, *, medmax: bool = False) -> MergeResult:
    """Write ``out`` from ``OUT.parts``: every input row exactly once (or reported unreadable), in input order."""
    out, parts = Path(out), parts_dir(out)
    manifest_path = parts / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{parts}: nothing to merge (no manifest.json; run medtune tokenize-images first)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    dones = _read_dones(parts, manifest["num_shards"])
    chunks = sorted(parts.glob("shard-*/chunk-*.parquet"))
    positions, locations = _chunk_index(chunks)
    failed = np.array(sorted(f["position"] for done in dones for f in done["failures"]), dtype=np.int64)
    _check_complete(positions, failed, manifest["rows"], parts)
    order = np.argsort(positions, kind="stable")
    schema = MEDMAX_SCHEMA if medmax else CODES_SCHEMA
    written = 0
    with atomic_open(out, "wb") as handle, pq.ParquetWriter(handle, schema) as writer:
        seen_paths: set[str] = set()
        for group in _gathered(chunks, locations[order], cache_size=2 * manifest["num_shards"] + 4):
            table = _medmax_table(group, seen_paths) if medmax else group.select(CODES_SCHEMA.names)
            writer.write_table(table.cast(schema), row_group_size=MERGE_ROW_GROUP)
            written += table.num_rows
    shutil.rmtree(parts)
    skipped = collections.Counter()
    for done in dones:
        skipped.update(done["skipped"])
    input_tally = Tally(**{k: v for k, v in dones[0]["input"].items() if k in ("read", "written", "notes")},
                        skipped=collections.Counter(dones[0]["input"]["skipped"]))
    return MergeResult(out, manifest["rows"], written, len(positions), skipped, input_tally)


def _read_dones(parts: Path, num_shards: int) -> list[dict]:
    missing = [i for i in range(num_shards) if not (_shard_dir(parts, num_shards, i) / "done.json").is_file()]
    if missing:
        raise UserError(f"cannot merge {parts}: shard{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} "
                        f"of {num_shards} not finished (run them, with --num-shards {num_shards} --shard-index I)")
    return [json.loads((_shard_dir(parts, num_shards, i) / "done.json").read_text(encoding="utf-8"))
            for i in range(num_shards)]


def _chunk_index(chunks: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Every row's input position, and where it lies: (chunk number, row in chunk)."""
    positions, locations = [], []
    for number, chunk in enumerate(chunks):
        column = pq.read_table(chunk, columns=["position"]).column("position").to_numpy()
        positions.append(column)
        locations.append(np.stack([np.full(len(column), number), np.arange(len(column))], axis=1))
    if not chunks:
        return np.empty(0, np.int64), np.empty((0, 2), np.int64)
    return np.concatenate(positions), np.concatenate(locations)


def _check_complete(positions: np.ndarray, failed: np.ndarray, rows: int, parts: Path) -> None:
    """Every input row is in exactly one chunk or among the unreadable images; nothing else is there."""
    found = shards.coverage(range(rows), np.concatenate([positions, failed]).tolist())
    if not found.complete:
        raise UserError(f"cannot merge {parts}: {found.describe('input row positions', limit=5)}")


def _gathered(chunks: Sequence[Path], locations: np.ndarray, cache_size: int) -> Iterator[pa.Table]:
    """Tables of MERGE_ROW_GROUP rows in ``locations`` order, reading each chunk into a small LRU cache."""
    cache: OrderedDict[int, pa.Table] = OrderedDict()

    def chunk(number: int) -> pa.Table:
        if number not in cache:
            cache[number] = pq.read_table(chunks[number])
            if len(cache) > cache_size:
                cache.popitem(last=False)
        cache.move_to_end(number)
        return cache[number]

    for start in range(0, len(locations), MERGE_ROW_GROUP):
        group = locations[start:start + MERGE_ROW_GROUP]
        pieces, order = [], np.empty(len(group), np.int64)
        filled = 0
        for number in dict.fromkeys(group[:, 0].tolist()):
            where = np.flatnonzero(group[:, 0] == number)
            pieces.append(chunk(number).take(pa.array(group[where, 1])))
            order[where] = np.arange(filled, filled + len(where))
            filled += len(where)
        yield pa.concat_tables(pieces).take(pa.array(order))


def _medmax_table(group: pa.Table, seen_paths: set[str]) -> pa.Table:
    """MedMax's layout: ``img_path``, ``img_tokens``; one row per distinct path (the first one in input order)."""
    keep = []
    for index, path in enumerate(group.column("image").to_pylist()):
        if path not in seen_paths:
            seen_paths.add(path)
            keep.append(index)
    kept = group.take(pa.array(keep, pa.int64()))
    return pa.table({"img_path": kept.column("image"), "img_tokens": kept.column("codes")})


# ---------------------------------------------------------------------------------------------------- reading

def read_codes(path: str | os.PathLike) -> dict[Any, list[int]]:
    """Precomputed codes from any layout medtune or MedMax writes.

    * medtune Parquet (``id``, ``image_index``, ``codes``): keys ``(sample id, image index)``;
    * MedMax Parquet (``img_path``, ``img_tokens``): keys are image paths;
    * a MedMax JSONL file (``image_tokens`` beside ``text``) or a canonical JSONL file whose ``meta.extra`` holds
      ``image_tokens`` (what ``data convert --from medmax`` keeps): keys ``(sample id, image index)``, ids as the
      medmax reader assigns them. ``image_tokens`` is one list (one image) or a list per image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() == ".parquet":
        return _read_parquet_codes(path)
    return _read_jsonl_codes(path)


def _read_parquet_codes(path: Path) -> dict[Any, list[int]]:
    names = set(pq.read_schema(path).names)
    if {"id", "image_index", "codes"} <= names:
        table = pq.read_table(path, columns=["id", "image_index", "codes"])
        keys = list(zip(table.column("id").to_pylist(), table.column("image_index").to_pylist()))
        values = table.column("codes").to_pylist()
    elif {"img_path", "img_tokens"} <= names:
        table = pq.read_table(path, columns=["img_path", "img_tokens"])
        keys, values = table.column("img_path").to_pylist(), table.column("img_tokens").to_pylist()
    else:
        raise UserError(f"{path}: not an image-codes file (columns {sorted(names)}; expected id, image_index, codes "
                        "or MedMax's img_path, img_tokens)")
    return _unique(path, zip(keys, values))


def _read_jsonl_codes(path: Path) -> dict[Any, list[int]]:
    from medtune.data.formats import read_records

    with open(path, encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "{}")
    fmt = "canonical" if '"messages"' in first else "medmax"
    pairs = []
    for sample in read_records(fmt, path, tally=Tally(), strict=True):
        tokens = sample.meta.extra.get("image_tokens")
        if tokens is None:
            continue
        per_image = tokens if tokens and isinstance(tokens[0], list) else [tokens]
        if len(per_image) != len(sample.images):
            raise UserError(f"{path}: sample {sample.id!r} has {len(sample.images)} images but image_tokens for "
                            f"{len(per_image)}")
        pairs.extend(((sample.id, index), codes) for index, codes in enumerate(per_image))
    return _unique(path, pairs)


def _unique(path: Path, pairs: Iterable[tuple[Any, Any]]) -> dict[Any, list[int]]:
    out: dict[Any, list[int]] = {}
    for key, codes in pairs:
        if not isinstance(codes, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                  for c in codes):
            raise UserError(f"{path}: codes of {key!r} are not a list of non-negative integers")
        if key in out and out[key] != codes:
            raise UserError(f"{path}: {key!r} has two different code lists")
        out[key] = codes
    return out


__all__ = [
    "CODES_SCHEMA", "ImageRow", "MEDMAX_SCHEMA", "MergeResult", "ShardResult", "Source", "check_output", "iter_rows",
    "merge_parts", "open_source", "parts_dir", "read_codes", "tokenize_images",
]
