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

:func:`save_sentencepiece_tokenizer` writes the other kind a checkpoint may carry: a Llama-2-style folder whose
only vocabulary is a sentencepiece ``tokenizer.model`` (PathChat's LLM family), trained on the same text. Reading
it needs sentencepiece and protobuf (the models extra); tests use it to check that such checkpoints load.
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


def save_sentencepiece_tokenizer(directory: str | Path, vocab_size: int = 1000) -> Path:
    """Write a Llama-2-style tokenizer folder: ``tokenizer.model`` + ``tokenizer_config.json``, no tokenizer.json.

    The model is a sentencepiece BPE trained on :func:`training_text` with byte fallback (every string encodes)
    and Llama 2's ids (unk 0, bos 1, eos 2, no pad), single-threaded so the same inputs give the same file.
    """
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0, num_threads=1,
        minloglevel=2)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": BOS, "eos_token": EOS, "unk_token": UNK,
              "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "model_max_length": 4096, "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory
