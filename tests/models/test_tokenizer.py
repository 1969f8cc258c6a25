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


def test_a_sentencepiece_only_tokenizer_loads_and_builds_a_model(tmp_path):
    """A Llama-2-style checkpoint's tokenizer is only ``tokenizer.model`` (PathChat's LLM family): it needs
    sentencepiece and protobuf (the models extra), and a VLM builds on it."""
    torch = pytest.importorskip("torch")  # sentencepiece and protobuf are in the models extra: no skip for them
    from medtune.models.build import build_vlm, load_vlm
    from medtune.models.presets import tiny_spec

    folder = offline.save_sentencepiece_tokenizer(tmp_path / "llama-tokenizer", vocab_size=600)
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    vlm = build_vlm(tiny_spec(tokenizer=str(folder)))
    tokenizer = vlm.tokenizer
    assert "Llama" in type(tokenizer).__name__
    ids = tokenizer("<image>\nIs there a lung mass?", add_special_tokens=False)["input_ids"]
    assert ids.count(vlm.image_token_id) == 1 and tokenizer.unk_token_id not in ids
    assert vlm.model.get_input_embeddings().num_embeddings >= len(tokenizer)
    vlm.save(tmp_path / "vlm")
    again = load_vlm(tmp_path / "vlm")
    assert again.tokenizer("Is there a lung mass?")["input_ids"] == tokenizer("Is there a lung mass?")["input_ids"]
    with torch.no_grad():
        assert vlm.model(input_ids=torch.tensor([ids[1:]])).logits.shape[-1] >= len(tokenizer)
