"""The MoE kind: a composed model upcycled to experts keeps its outputs (preserving init), saves and loads as
its own kind without DeepSpeed or a process group, and assigns every parameter to vision / projector / llm /
ffn / experts / router."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from medtune.models.build import build_vlm, load_vlm  # noqa: E402
from medtune.models.kinds.base import MEDTUNE_FILE  # noqa: E402
from medtune.models.moe.settings import MoESettings  # noqa: E402
from medtune.models.presets import tiny_spec  # noqa: E402

torch.set_num_threads(1)


def _inputs(vlm, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = vlm.image_tokens_per_image
    ids = torch.randint(5, len(vlm.tokenizer) - 1, (2, 20), generator=generator)
    ids[:, 1:1 + n] = vlm.image_token_id
    pixels = torch.rand(2, 3, vlm.image_size, vlm.image_size, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def _logits(vlm, inputs):
    with torch.no_grad():
        return vlm.model.eval()(**inputs).logits


@pytest.fixture
def dense():
    return build_vlm(tiny_spec())


def test_preserving_upcycling_keeps_the_dense_logits_and_faithful_does_not(dense):
    inputs = _inputs(dense)
    reference = _logits(dense, inputs)
    moe = build_vlm(tiny_spec()).with_experts(MoESettings(init="preserving", layers="dense"))
    assert moe.kind == "moe" and moe.model.config.moe_layers == list(range(len(moe.decoder_layers())))
    assert torch.equal(_logits(moe, inputs), reference)
    faithful = build_vlm(tiny_spec()).with_experts(MoESettings.preset("med-moe"))
    assert not torch.allclose(_logits(faithful, inputs), reference, atol=1e-4)


def test_a_saved_moe_model_loads_as_the_moe_kind_with_identical_logits(dense, tmp_path):
    moe = dense.with_experts(MoESettings.preset("med-moe", layers=[0]), router_state=None)
    moe.save(tmp_path)
    assert json.loads((tmp_path / MEDTUNE_FILE).read_text())["kind"] == "moe"
    loaded = load_vlm(tmp_path)
    assert loaded.kind == "moe" and loaded.settings == moe.settings
    inputs = _inputs(moe, seed=1)
    assert torch.equal(_logits(loaded, inputs), _logits(moe, inputs))
    # experts are stored one by one, as released MoE checkpoints are
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any(".mlp.experts.3." in key for key in keys) and not any(k.endswith("experts.gate_up_proj")
                                                                    for k in keys)


def test_every_parameter_has_a_part_and_the_moe_parts_are_the_right_ones(dense):
    moe = dense.with_experts(MoESettings(layers=[0]))
    by_part = {}
    for name, _ in moe.model.named_parameters():
        by_part.setdefault(moe.part_of(name), []).append(name)
    assert set(by_part) == {"vision", "projector", "llm", "ffn", "experts", "router"}
    assert all(".layers.0.mlp.gate." in n for n in by_part["router"])
    assert all(".layers.0.mlp." in n for n in by_part["experts"])
    assert all(".mlp." in n and ".layers.0." not in n for n in by_part["ffn"])
    assert not any(".mlp." in n for n in by_part["llm"] if "language_model" in n)
    # the vision tower's MLPs stay vision
    assert any(".mlp." in n for n in by_part["vision"])


def test_moe_settings_that_differ_from_the_model_s_are_refused(dense):
    moe = dense.with_experts(MoESettings(layers=[0]))
    assert moe.with_experts(MoESettings(layers=[0])) is moe
    with pytest.raises(ValueError, match="already has experts, made with other moe settings"):
        moe.with_experts(MoESettings(layers=[0], num_experts=2))


def test_a_native_model_holds_experts_as_a_component_and_reloads_with_identical_logits(tmp_path, dense):
    """Plain transformers' Llava (the native kind) keeps its class and kind; medtune.json records the experts,
    which are rebuilt before the weights load; parts and saved keys are the moe kind's."""
    dense.model.save_pretrained(tmp_path / "dense")
    dense.processor.save_pretrained(tmp_path / "dense")
    native = load_vlm(tmp_path / "dense").with_experts(MoESettings.preset("med-moe", layers=[1]), domain_field="organ")
    assert native.kind == "native" and type(native.model).__name__ == "LlavaForConditionalGeneration"
    assert {native.part_of(n) for n, _ in native.model.named_parameters()} == {
        "vision", "projector", "llm", "ffn", "experts", "router"}
    native.save(tmp_path / "moe")
    recorded = json.loads((tmp_path / "moe" / MEDTUNE_FILE).read_text())["experts"]
    assert recorded["layers"] == [1] and recorded["domain_field"] == "organ"
    loaded = load_vlm(tmp_path / "moe")
    assert loaded.kind == "native" and loaded.experts.settings == native.experts.settings
    assert "organ" in loaded.sample_metadata
    inputs = _inputs(dense, seed=2)
    assert torch.equal(_logits(loaded, inputs), _logits(native, inputs))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "moe" / "model.safetensors"), "pt") as handle:
        assert any(".layers.1.mlp.experts.3.down_proj" in key for key in handle.keys())


@pytest.fixture(scope="module")
def saved_moe(tmp_path_factory):
    """A tiny MoE model (faithful init, random router) whose routing statistics group by organ, saved."""
    directory = tmp_path_factory.mktemp("moe")
    build_vlm(tiny_spec()).with_experts(MoESettings.preset("med-moe", layers=[0]), domain_field="organ").save(directory)
    return directory


def test_batched_generation_equals_one_by_one_and_needs_no_process_group(saved_moe):
    from PIL import Image

    from medtune.models.generation import GenerationSettings, Generator

    vlm = load_vlm(saved_moe)
    generator = Generator(vlm)
    questions = ["Is the lung normal?", "Which organ is this?", "Is there a mass in the liver or not?"]
    conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
                     for q in questions]
    images = [[Image.new("RGB", (40, 30), colour)] for colour in ("gray", "white", "black")]
    settings = GenerationSettings(max_new_tokens=6)
    together = generator.generate(conversations, images, settings)
    alone = [generator.generate([c], [i], settings)[0] for c, i in zip(conversations, images)]
    assert together == alone
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_eval_run_reports_which_expert_each_organ_s_prompt_tokens_took(saved_moe, tmp_path):
    from medtune.cli import main
    from medtune.eval.tasks import get_task

    out = tmp_path / "eval"
    assert main(["eval", "run", "--task", "vqa-rad", "--model", str(saved_moe), "--out", str(out), "--limit", "12",
                 "--batch-size", "4"]) == 0
    routing = json.loads((out / "routing.json").read_text())
    assert routing["domain_field"] == "organ" and routing["layers"] == ["model.language_model.layers.0.mlp"]
    counts = torch.tensor(routing["counts"])   # [1 layer, organs, 4 experts]
    # every prompt token of every question is counted once, under its question's organ
    vlm = load_vlm(saved_moe)
    task = get_task("vqa-rad")
    samples = task.samples()[:12]
    from medtune.eval.run import _ImageCache, _request, _settings
    from medtune.data.jsonl import Tally

    images = _ImageCache(task.image_root or task.data_path.parent)
    per_organ = {}
    for sample in samples:
        request = _request(task, sample, _settings(task, sample), images, Tally(), strict=True)
        prompt = vlm.encode_prompt([{"role": m["role"], "content": [{"type": "image"} if p.get("type") == "image"
                                                                     else p for p in m["content"]]}
                                    for m in request.messages], request.images)
        per_organ[sample.meta.organ] = per_organ.get(sample.meta.organ, 0) + prompt["input_ids"].shape[1]
    assert {name: int(counts[0, i].sum()) for i, name in enumerate(routing["domains"])} == per_organ
    assert (out / "routing.md").is_file() and (out / "routing.png").stat().st_size > 0
