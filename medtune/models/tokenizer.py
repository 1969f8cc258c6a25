"""An offline tokenizer for tiny models: byte-level BPE trained on the bundled VQA-RAD text.

Tests and the demo must never fetch a tokenizer from a hub, yet they need one that behaves like the
real thing (subword merges, special tokens, a chat template, save/load through transformers). So we
train a small byte-level BPE with the ``tokenizers`` library on the questions and answers of the bundled
VQA-RAD files and wrap it as a transformers fast tokenizer.

Choices:
- Byte-level: every string is encodable (no unknown characters), like GPT-2/Llama-3/Qwen tokenizers.
- Deterministic: the training text is read in file order and the trainer is single-threaded at our
  sizes, so the same inputs always give the same vocabulary (a test checks it).
- No automatic BOS/EOS: like chat-model tokenizers, the chat template writes ``bos_token``
  explicitly, so ``apply_chat_template`` and medtune's renderer agree without double BOS.
- Built once: the result is cached under ``$MEDTUNE_CACHE`` (default ``~/.cache/medtune``), keyed by a
  hash of the training text and the settings, and later calls load it from disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from medtune.paths import bundled_data

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IMAGE_TOKEN = "<image>"
# ChatML turn markers are single tokens in the models that use them (Qwen, InternLM2); making them
# special here lets the chatml-style templates render and decode the same way on the tiny models.
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK, IMAGE_TOKEN, *CHATML_TOKENS)
DEFAULT_VOCAB_SIZE = 2048
_FORMAT_VERSION = "1"  # bump when the construction below changes, so stale caches are not reused


def cache_root() -> Path:
    return Path(os.environ.get("MEDTUNE_CACHE", Path.home() / ".cache" / "medtune"))


def training_text() -> list[str]:
    """Questions and answers of every bundled VQA-RAD JSON file, in a fixed order."""
    lines: list[str] = []
    for path in sorted(bundled_data("vqa_rad").glob("*.json")):
        for record in json.loads(path.read_text(encoding="utf-8")):
            lines.extend(str(record[key]) for key in ("question", "answer") if record.get(key) is not None)
    return lines


def offline_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: str | Path | None = None):
    """The offline tokenizer (a ``PreTrainedTokenizerFast``), trained on first use and cached on disk."""
    from transformers import PreTrainedTokenizerFast

    text = training_text()
    key = hashlib.sha256("\n".join([_FORMAT_VERSION, str(vocab_size), *text]).encode()).hexdigest()[:16]
    directory = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers" / f"vqa-rad-bpe-{key}"
    if not (directory / "tokenizer.json").exists():
        _train_and_save(text, vocab_size, directory)
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def _train_and_save(text: list[str], vocab_size: int, directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(text, trainer=trainer, length=len(text))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        additional_special_tokens=[IMAGE_TOKEN, *CHATML_TOKENS],
        model_max_length=4096, clean_up_tokenization_spaces=False,
    )
    # Write to a temporary sibling and rename, so a concurrent or interrupted build never leaves a
    # half-written cache entry that later runs would trust.
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=directory.parent))
    try:
        wrapped.save_pretrained(str(staging))
        try:
            staging.rename(directory)
        except OSError:
            if not (directory / "tokenizer.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
