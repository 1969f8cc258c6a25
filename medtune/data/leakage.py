"""Train/test leakage: what an evaluation set shares with the training set, and a training set without it.

``medtune data leakage TRAIN TEST`` compares every training sample with the evaluation samples and reports
four kinds of overlap, each with the ids involved (``--report`` writes them all as JSON):

1. Shared images, by content: the SHA-256 of each image file's bytes, so a copy under another name still
   counts. Reported (how many test images also appear in training, and how many training samples use them)
   but not removed: in VQA-RAD every test image is also a training image, so dropping them would drop the
   whole radiology content of the training set; image overlap is a property of the benchmark to state.
2. Exact pairs: a training sample with the same images (by content), the same question and the same answer as
   a test sample. Question and answer are normalised by Unicode NFKC, case folding and collapsing whitespace;
   punctuation is kept, so "Is the mass well circumscribed" and "... circumscribed?" are not exact but do
   show up as near duplicates (Jaccard 1.0).
3. Templated rephrasings (VQA-RAD "frame" records). The MEVF training split adds 1,267 records with
   ``phrase_type`` "frame": the public JSON's ``question_frame`` of a source question, a template such as
   "Is/Are there a rib fracture?", kept with the source's image and answer. MEVF writes each frame right after
   its source question and numbers both consecutively, so a frame's source is the record whose qid is one less
   (checked for all 1,267 frames against the public JSON: the source's ``question_frame`` is the frame's text).
   A frame is a rephrasing of a test question when its source is a test record with the same image and answer,
   **and** no frame of a non-test source has the same image, question and answer: a record that training data
   produces on its own is training data, removing its copy would not remove the text from training, and it is
   not evidence of leakage. On VQA-RAD this gives 283 of the 1,267 frames (284 test-sourced minus the one,
   "Where is/are the lesion located?" on synpic31955.jpg, that a training paraphrase also produces), the same
   283 as counting frames whose text, image and answer match a test record's ``question_frame`` in the public
   JSON and no training record's. Frames are recognised by ``meta.extra["phrase_type"] == "frame"`` and an
   integer id (the qid); other datasets have none, and this category is then 0.
4. Near-duplicate questions: a training question on the same images as a test question whose token sets
   (runs of word characters of the normalised text, so punctuation and word order do not matter) have a Jaccard
   similarity of at least ``--near-threshold`` (default 0.8), exact pairs excluded. Answers are not compared:
   the same question on the same image teaches the answer even when phrased differently. Each training sample
   is reported once, with its most similar test question.

``--clean OUT`` writes the training set as canonical JSONL without the samples in the categories named by
``--remove`` (default: exact pairs and rephrasings; add ``near`` to also drop near duplicates). Image paths in
OUT stay relative to the training set's image root, which is printed. Both files are streamed: the test set's
fingerprints and the training set's frame records are kept in memory, not the samples, and ``--clean`` reads
the training set a second time.

Files are read through the formats registry (``--format vqa-rad`` for the MEVF files; canonical JSONL by
default), whose VQA-RAD reader keeps the qid as the sample id and ``phrase_type`` in ``meta.extra``.
"""
from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from medtune.data.files import hash_file
from medtune.data.jsonl import SampleWriter, Tally
from medtune.data.schema import Sample

DEFAULT_NEAR_THRESHOLD = 0.8
CATEGORIES = ("exact", "rephrasing", "near")
DEFAULT_REMOVE = ("exact", "rephrasing")
FRAME = "frame"


def normalise(text: str) -> str:
    """Text compared for exact pairs: NFKC, case-folded, whitespace collapsed (punctuation kept)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def question_tokens(text: str) -> frozenset[str]:
    """The token set compared for near duplicates: runs of word characters of the normalised text."""
    return frozenset(re.findall(r"\w+", normalise(text)))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class ImageHasher:
    """SHA-256 of image files, cached per path; an unreadable image is keyed by its path and counted."""

    def __init__(self):
        self._cache: dict[Path, str] = {}
        self.unreadable: dict[str, str] = {}   # path -> reason

    def key(self, root: Path, relative: str) -> str:
        path = Path(os.path.abspath(root / relative))
        if path not in self._cache:
            self._cache[path] = self._hash(path)
        return self._cache[path]

    def _hash(self, path: Path) -> str:
        try:
            digest = hash_file(path)
        except OSError as error:
            self.unreadable[str(path)] = error.strerror or type(error).__name__
            return f"unreadable:{path}"
        return digest.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """What leakage compares of a sample: its images by content, normalised question and answer, tokens."""

    id: str
    images: tuple[str, ...]
    question: str
    answer: str
    tokens: frozenset[str]

    @property
    def pair_key(self) -> tuple:
        return self.images, self.question, self.answer

    @classmethod
    def of(cls, sample: Sample, image_root: Path, hasher: ImageHasher) -> "Fingerprint":
        answer = sample.meta.answer
        if answer is None:
            answer = next((m.text for m in sample.messages if m.role == "assistant"), "")
        return cls(sample.id, tuple(hasher.key(image_root, i.path) for i in sample.images),
                   normalise(sample.question), normalise(answer), question_tokens(sample.question))


def _int_id(sample_id: str) -> int | None:
    return int(sample_id) if sample_id.lstrip("-").isdigit() else None


@dataclass
class TestIndex:
    """The evaluation set's fingerprints, indexed for the three comparisons."""

    by_images: dict[tuple, list[Fingerprint]] = field(default_factory=dict)
    by_pair: dict[tuple, str] = field(default_factory=dict)
    by_int_id: dict[int, Fingerprint] = field(default_factory=dict)
    image_hashes: set[str] = field(default_factory=set)
    records: int = 0

    def add(self, fingerprint: Fingerprint) -> None:
        self.records += 1
        self.by_images.setdefault(fingerprint.images, []).append(fingerprint)
        self.by_pair.setdefault(fingerprint.pair_key, fingerprint.id)
        self.image_hashes.update(fingerprint.images)
        number = _int_id(fingerprint.id)
        if number is not None:
            self.by_int_id[number] = fingerprint


@dataclass
class LeakageReport:
    """Findings, keyed by the training record's position in its file (ids need not be unique)."""

    near_threshold: float
    train_records: int = 0
    test_records: int = 0
    frame_records: int = 0
    test_images: int = 0
    test_images_in_train: int = 0
    train_records_on_test_images: int = 0
    exact: dict[int, dict] = field(default_factory=dict)
    rephrasing: dict[int, dict] = field(default_factory=dict)
    rephrasing_also_from_training: list[dict] = field(default_factory=list)
    near: dict[int, dict] = field(default_factory=dict)

    def positions(self, categories: Iterable[str]) -> set[int]:
        return {position for category in categories for position in getattr(self, category)}

    def to_dict(self) -> dict:
        return {
            "near_threshold": self.near_threshold,
            "train_records": self.train_records, "test_records": self.test_records,
            "images": {"test_images": self.test_images, "test_images_in_train": self.test_images_in_train,
                       "train_records_on_test_images": self.train_records_on_test_images},
            "exact_pairs": {"count": len(self.exact), "pairs": list(self.exact.values())},
            "rephrasings": {"count": len(self.rephrasing), "frame_records": self.frame_records,
                            "also_from_training": self.rephrasing_also_from_training,
                            "pairs": list(self.rephrasing.values())},
            "near_duplicates": {"count": len(self.near), "pairs": list(self.near.values())},
        }

    def lines(self) -> list[str]:
        return [
            f"test images also in training (by content): {self.test_images_in_train}/{self.test_images} "
            f"({self.train_records_on_test_images} of {self.train_records} training records use them)",
            f"exact pairs (same image, question and answer as a test record): {len(self.exact)}",
            f"templated rephrasings of test questions: {len(self.rephrasing)} of {self.frame_records} frame records"
            + (f" ({len(self.rephrasing_also_from_training)} more also produced by training questions, kept)"
               if self.rephrasing_also_from_training else ""),
            f"near-duplicate questions on the same image (Jaccard >= {self.near_threshold:g}): {len(self.near)}",
        ]


def find_leakage(train: Iterable[tuple[Sample, Path]], test: Iterable[tuple[Sample, Path]], *,
                 near_threshold: float = DEFAULT_NEAR_THRESHOLD, hasher: ImageHasher | None = None
                 ) -> LeakageReport:
    """Compare ``(sample, image_root)`` streams; the test stream is indexed first, the training one streamed."""
    hasher = hasher or ImageHasher()
    index = TestIndex()
    for sample, root in test:
        index.add(Fingerprint.of(sample, root, hasher))
    report = LeakageReport(near_threshold, test_records=index.records, test_images=len(index.image_hashes))
    train_image_hashes: set[str] = set()
    frames: list[tuple[int, Fingerprint]] = []
    for position, (sample, root) in enumerate(train):
        fingerprint = Fingerprint.of(sample, root, hasher)
        report.train_records += 1
        train_image_hashes.update(fingerprint.images)
        if index.image_hashes.intersection(fingerprint.images):
            report.train_records_on_test_images += 1
        _compare(position, fingerprint, index, report)
        if sample.meta.extra.get("phrase_type") == FRAME and _int_id(sample.id) is not None:
            frames.append((position, fingerprint))
    report.test_images_in_train = len(index.image_hashes & train_image_hashes)
    report.frame_records = len(frames)
    _find_rephrasings(frames, index, report)
    return report


def _compare(position: int, train: Fingerprint, index: TestIndex, report: LeakageReport) -> None:
    """Exact pair or near duplicate of a test record on the same images (at most one of the two)."""
    test_id = index.by_pair.get(train.pair_key)
    if test_id is not None:
        report.exact[position] = {"train_id": train.id, "test_id": test_id}
        return
    best, best_score = None, -1.0
    for candidate in index.by_images.get(train.images, ()):
        score = jaccard(train.tokens, candidate.tokens)
        if score > best_score:
            best, best_score = candidate, score
    if best is not None and best_score >= report.near_threshold:
        report.near[position] = {"train_id": train.id, "test_id": best.id, "jaccard": round(best_score, 4)}


def _find_rephrasings(frames: list[tuple[int, Fingerprint]], index: TestIndex, report: LeakageReport) -> None:
    """Frames whose source (qid - 1) is a test record, unless a non-test source yields the same record."""
    from_test, from_training = [], set()
    for position, frame in frames:
        source = index.by_int_id.get(_int_id(frame.id) - 1)
        if source is not None and (source.images, source.answer) == (frame.images, frame.answer):
            from_test.append((position, frame, source))
        else:
            from_training.add(frame.pair_key)
    for position, frame, source in from_test:
        pair = {"train_id": frame.id, "test_id": source.id}
        if frame.pair_key in from_training:
            report.rephrasing_also_from_training.append(pair)
        else:
            report.rephrasing[position] = pair


def write_clean(samples: Iterable[Sample], out: Path, drop: set[int], tally: Tally) -> None:
    """Write the training samples whose positions are not in ``drop`` (canonical JSONL, atomically)."""
    with SampleWriter(out, tally) as writer:
        for position, sample in enumerate(samples):
            if position not in drop:
                writer.write(sample)


# ------------------------------------------------------------------------------------- `medtune data leakage`
