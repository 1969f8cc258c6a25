"""The offline tokenizer: deterministic, built once then read from its cache, lossless on text with
special tokens, and the image/chat markers are single special tokens."""
import pytest

pytest.importorskip("tokenizers")

from medtune.models import tokenizer as offline  # noqa: E402

TEXT = "USER: <image>\nIs there a pneumothorax in the left lung? ASSISTANT: No, there is none.</s>"


def test_training_is_deterministic(tmp_path):
    first = offline.offline_tokenizer(cache_dir=tmp_path / "a")
    second = offline.offline_tokenizer(cache_dir=tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert first(TEXT)["input_ids"] == second(TEXT)["input_ids"]


def test_second_call_reads_the_cache(tmp_path, monkeypatch):
    offline.offline_tokenizer(cache_dir=tmp_path)

    def must_not_train(*args, **kwargs):
        raise AssertionError("retrained although the cache exists")

    monkeypatch.setattr(offline, "_train_and_save", must_not_train)
    assert len(offline.offline_tokenizer(cache_dir=tmp_path)) == offline.DEFAULT_VOCAB_SIZE


def test_default_cache_is_keyed_under_medtune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path))
    offline.offline_tokenizer(vocab_size=600)
    (entry,) = (tmp_path / "tokenizers").iterdir()
    assert entry.name.startswith("vqa-rad-bpe-") and (entry / "tokenizer.json").exists()


def test_round_trip_and_special_tokens(tmp_path):
    tok = offline.offline_tokenizer(cache_dir=tmp_path)
    ids = tok(TEXT)["input_ids"]
    assert tok.decode(ids) == TEXT  # byte-level: lossless, no unknown tokens
    assert tok.unk_token_id not in ids
    assert ids[0] != tok.bos_token_id  # no automatic BOS: chat templates write it
    for special in (offline.IMAGE_TOKEN, *offline.CHATML_TOKENS, offline.EOS):
        assert tok(special, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    assert tok.image_token == offline.IMAGE_TOKEN
    # Subword merges learned from the medical text: a frequent word is one token.
    assert len(tok(" lung", add_special_tokens=False)["input_ids"]) == 1
    assert "<image>" not in tok.decode(ids, skip_special_tokens=True)
