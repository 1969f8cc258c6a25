"""Native export of an upcycled Qwen2 model (medtune/models/moe/qwen2_export.py): plain transformers, in a process where
medtune cannot be imported, loads the saved Llava + Qwen2-MoE folder and gives the medtune MoE model's logits;
Med-MoE's even MoE layers are the native sparse layers; experts are stored one key each; the router bias the
native form cannot hold is measured; settings it cannot hold are refused by name."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from medtune.errors import SpecError  # noqa: E402
from medtune.models.build import build_vlm, load_vlm  # noqa: E402
from medtune.models.kinds.base import MEDTUNE_FILE  # noqa: E402
from medtune.models.moe.qwen2_export import save_native_qwen2_moe, to_native_qwen2_moe  # noqa: E402
from medtune.models.moe.settings import MoESettings  # noqa: E402
from medtune.models.presets import tiny_spec  # noqa: E402

torch.set_num_threads(1)

# 6 layers so that Med-MoE's sparse mode gives 0, 2, 4 (and Qwen2-MoE's step 2 would give 1, 3, 5); tied
# embeddings as the small Qwen2 checkpoints have them.
QWEN2 = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "tie_word_embeddings": True}
TOLERANCE = 1e-6   # fp32; measured: 0.0 (the same kernels on the same tensors)

# Runs with -I -S: no site processing, so medtune's editable install (a .pth import hook) is never set up;
# site-packages is then put back on sys.path by hand (without its .pth files).
CHILD = r"""
import json, sys
site_packages, folder, inputs_path, out = sys.argv[1:]
sys.path.append(site_packages)
try:
    import medtune
    medtune_importable = True
except ImportError:
    medtune_importable = False
import torch
torch.set_num_threads(1)
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
with torch.no_grad():
    logits = model(**torch.load(inputs_path, weights_only=True)).logits
torch.save(logits, out + ".pt")
processor = AutoProcessor.from_pretrained(folder)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
batch = processor(images=Image.new("RGB", (32, 32), (90, 120, 150)), text=prompt, return_tensors="pt")
with torch.no_grad():
    generated = model.generate(**batch, max_new_tokens=2, do_sample=False)
json.dump({"medtune_importable": medtune_importable,
           "medtune_modules": sorted(m for m in sys.modules if m.split(".")[0] == "medtune"),
           "model_class": type(model).__name__, "text_model_type": model.config.text_config.model_type,
           "mlp_classes": [type(layer.mlp).__name__ for layer in model.model.language_model.layers],
           "processor_class": type(processor).__name__, "prompt_ids": batch["input_ids"][0].tolist(),
           "generated_tokens": generated.shape[1] - batch["input_ids"].shape[1]}, open(out + ".json", "w"))
"""


def _upcycled(spec=None, *, bias=None, seed=0, **settings):
    """A tiny composed VLM upcycled with Med-MoE's settings (faithful init) and a router of zero bias, whose
    weights are large enough that tokens go to different experts; ``bias`` ([E]) then set in every layer."""
    dense = build_vlm(spec or tiny_spec(llm=QWEN2))
    generator = torch.Generator().manual_seed(seed)
    router = {"weight": torch.randn(4, dense.model.config.text_config.hidden_size, generator=generator),
              "bias": torch.zeros(4)}
    vlm = dense.with_experts(MoESettings.preset("med-moe", **settings), router_state=router)
    if bias is not None:
        with torch.no_grad():
            for layer in vlm.model.config.moe_layers:
                vlm.decoder_layers()[layer].mlp.gate.bias.copy_(bias)
    return vlm


def _probe(vlm, seed=1):
    generator = torch.Generator().manual_seed(seed)
    n = vlm.image_tokens_per_image
    ids = torch.randint(5, len(vlm.tokenizer) - 1, (2, n + 24), generator=generator)
    ids[:, 1:1 + n] = vlm.image_token_id
    pixels = torch.rand(2, 3, vlm.image_size, vlm.image_size, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def _logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The upcycled model, exported and saved, then loaded by plain transformers in a medtune-free process."""
    import transformers

    root = tmp_path_factory.mktemp("native")
    vlm = _upcycled()
    probe = _probe(vlm)
    report = save_native_qwen2_moe(vlm, root / "native", probe=probe)
    torch.save(probe, root / "inputs.pt")
    site_packages = str(Path(transformers.__file__).resolve().parents[1])
    script = root / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    result = subprocess.run([sys.executable, "-I", "-S", str(script), site_packages, str(root / "native"),
                             str(root / "inputs.pt"), str(root / "child")], check=False, capture_output=True,
                            text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    child = json.loads((root / "child.json").read_text())
    return {"vlm": vlm, "probe": probe, "report": report, "folder": root / "native", "child": child,
            "child_logits": torch.load(root / "child.pt", weights_only=True)}


def test_plain_transformers_without_medtune_gives_the_medtune_moe_logits(exported):
    child = exported["child"]
    assert child["medtune_importable"] is False and child["medtune_modules"] == []
    assert (child["model_class"], child["text_model_type"]) == ("LlavaForConditionalGeneration", "qwen2_moe")
    reference = _logits(exported["vlm"].model, exported["probe"])
    assert (exported["child_logits"] - reference).abs().max().item() <= TOLERANCE
    # the processor saved beside it prepares the same ids as medtune, and the model generates from them
    assert child["processor_class"] == "LlavaProcessor" and child["generated_tokens"] == 2
    from PIL import Image

    vlm = exported["vlm"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    ours = vlm.encode_prompt(messages, [Image.new("RGB", (32, 32))])
    assert child["prompt_ids"].count(vlm.image_token_id) == vlm.image_tokens_per_image
    assert child["prompt_ids"] == ours["input_ids"][0].tolist()


def test_med_moe_even_layers_are_the_native_sparse_layers(exported):
    classes = exported["child"]["mlp_classes"]
    assert [i for i, name in enumerate(classes) if name == "Qwen2MoeSparseMoeBlock"] == [0, 2, 4]
    assert [i for i, name in enumerate(classes) if name == "Qwen2MoeMLP"] == [1, 3, 5]
    assert exported["report"]["mlp_only_layers"] == [1, 3, 5]
    # why not Qwen2-MoE's own decoder_sparse_step=2: it makes the odd layers sparse
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    qwen2 = {key: value for key, value in QWEN2.items() if key != "model_type"}
    stepped = Qwen2MoeForCausalLM(Qwen2MoeConfig(**qwen2, vocab_size=16, num_experts=4, decoder_sparse_step=2,
                                                 moe_intermediate_size=8, shared_expert_intermediate_size=8))
    assert [i for i, layer in enumerate(stepped.model.layers)
            if type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock"] == [1, 3, 5]


def test_saved_weights_hold_one_key_per_expert(exported):
    from safetensors import safe_open

    with safe_open(str(exported["folder"] / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    for layer in (0, 2, 4):
        for expert in range(4):
            for name in ("gate_proj", "up_proj", "down_proj"):
                assert f"language_model.model.layers.{layer}.mlp.experts.{expert}.{name}.weight" in keys
        assert f"language_model.model.layers.{layer}.mlp.shared_expert_gate.weight" in keys
    assert not any(key.endswith(("experts.gate_up_proj", "experts.down_proj", "gate.bias")) for key in keys)
    assert not any(".layers.1.mlp.experts." in key for key in keys)


def test_medtune_loads_the_export_as_a_composed_llava(exported):
    metadata = json.loads((exported["folder"] / MEDTUNE_FILE).read_text())
    assert metadata["kind"] == "composed" and metadata["spec"] is None
    assert metadata["native_export"]["from_kind"] == "moe" and metadata["native_export"]["moe"]["init"] == "faithful"
    loaded = load_vlm(exported["folder"])
    assert loaded.kind == "composed" and type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    assert (_logits(loaded.model, exported["probe"]) - exported["child_logits"]).abs().max().item() == 0.0


def test_the_exact_mapping_reports_full_agreement_and_the_shared_expert_gate_is_frozen(exported):
    report = exported["report"]
    assert report["router_bias"]["max_abs"] == 0.0 and report["probe"]["routing_agreement"] == 1.0
    assert report["probe"]["max_abs_logit_diff"] <= TOLERANCE
    ours = exported["vlm"].decoder_layers()[0].mlp.shared_expert.down_proj.weight
    before = ours.detach().clone()
    native, _ = to_native_qwen2_moe(exported["vlm"], probe=exported["probe"])
    gates = [native.model.language_model.layers[i].mlp.shared_expert_gate.weight for i in (0, 2, 4)]
    assert all(not gate.requires_grad and not gate.any() for gate in gates)
    # the shared down projection is the medtune one doubled, exactly, and the medtune model is left as it was
    assert torch.equal(native.model.language_model.layers[0].mlp.shared_expert.down_proj.weight, 2 * before)
    assert torch.equal(ours, before)


@pytest.mark.parametrize("bias, changes", [
    (torch.full((4,), 2.5), False),                    # equal on all experts: softmax ignores it, exact
    (torch.tensor([1e-6, 0.0, -1e-6, 0.0]), False),   # uneven but far below any routing margin
    (torch.tensor([3.0, -2.0, 0.5, -4.0]), True),      # moves tokens between experts
])
def test_dropped_router_bias_is_reported_and_agreement_is_below_one_exactly_when_routing_changed(
        bias, changes, caplog):
    vlm = _upcycled(bias=bias)
    probe = _probe(vlm)
    with caplog.at_level(logging.WARNING, logger="medtune.models.moe.qwen2_export"):
        native, report = to_native_qwen2_moe(vlm, probe=probe)
    assert report["router_bias"]["max_abs"] == pytest.approx(bias.abs().max().item())
    assert report["router_bias"]["max_spread"] == pytest.approx((bias.max() - bias.min()).item())
    assert ("cannot be written in Qwen2-MoE" in caplog.text) == (report["router_bias"]["max_spread"] > 0)

    # the experts each model chose, per MoE layer, counted here directly from the two forward passes
    chosen = {"medtune": {}, "native": {}}
    hooks = [block.gate.register_forward_hook(lambda _m, _i, out, i=i: chosen["medtune"].__setitem__(i, out[2]))
             for i, block in ((i, vlm.decoder_layers()[i].mlp) for i in (0, 2, 4))]
    hooks += [native.model.language_model.layers[i].mlp.gate.register_forward_hook(
        lambda _m, _i, out, i=i: chosen["native"].__setitem__(i, out[2])) for i in (0, 2, 4)]
    ours, theirs = _logits(vlm.model, probe), _logits(native, probe)
    for hook in hooks:
        hook.remove()
    changed = any(not torch.equal(chosen["medtune"][i], chosen["native"][i]) for i in (0, 2, 4))
    assert changed is changes
    assert (report["probe"]["routing_agreement"] < 1) is changed
    for i in (0, 2, 4):
        share = (chosen["medtune"][i] == chosen["native"][i]).all(-1).float().mean().item()
        assert report["probe"]["per_layer"][str(i)] == pytest.approx(share)
    if not changes:   # same experts: only the routing weights moved (not at all for an equal bias)
        assert (ours - theirs).abs().max().item() <= (TOLERANCE if bias.unique().numel() == 1 else 1e-4)


@pytest.mark.parametrize("settings", [
    {"shared_expert_gate": True},            # a gated shared expert: its gate is copied
    {"shared_expert": False},                # none: an all-zero shared expert
    {"top_k": 2, "renormalize": True},       # top-2, renormalised -> norm_topk_prob
])
def test_other_moe_settings_map_exactly(settings):
    vlm = _upcycled(**settings)
    native, report = to_native_qwen2_moe(vlm, probe=_probe(vlm))
    assert report["probe"]["routing_agreement"] == 1.0 and report["probe"]["max_abs_logit_diff"] <= TOLERANCE
    text = native.config.text_config
    assert (text.num_experts_per_tok, text.norm_topk_prob) == (vlm.settings.top_k, vlm.settings.renormalize)
    shared = native.model.language_model.layers[0].mlp.shared_expert
    if not vlm.settings.shared_expert:
        assert not any(parameter.any() for parameter in shared.parameters())


@pytest.mark.parametrize("spec, settings, message", [
    (tiny_spec(llm={**QWEN2, "model_type": "llama"}), {}, "llm: the native MoE export needs a qwen2 LLM"),
    (tiny_spec(llm=QWEN2, projector="attn_pool+mlp2x_gelu"), {}, "projector: 'attn_pool\\+mlp2x_gelu'"),
    (tiny_spec(llm=QWEN2), {"capacity_factor": 1.0}, "moe.capacity_factor"),
])
def test_what_qwen2_moe_cannot_hold_is_refused_by_setting(spec, settings, message):
    vlm = _upcycled(spec, **settings)
    with pytest.raises(SpecError, match=message):
        to_native_qwen2_moe(vlm)


def test_a_dense_model_is_refused():
    with pytest.raises(SpecError, match="needs a medtune MoE model"):
        to_native_qwen2_moe(build_vlm(tiny_spec(llm=QWEN2)))


def test_cli_exports_a_saved_moe_checkpoint(tmp_path, capsys):
    from medtune.cli import main

    vlm = _upcycled()
    vlm.save(tmp_path / "moe")
    assert main(["model", "export-native", str(tmp_path / "moe"), str(tmp_path / "native")]) == 0
    out = capsys.readouterr().out
    assert "MoE layers [0, 2, 4]" in out and "routing agreement 1.0000" in out
    moe, native = load_vlm(tmp_path / "moe"), load_vlm(tmp_path / "native")
    probe = _probe(moe)
    assert (_logits(moe.model, probe) - _logits(native.model, probe)).abs().max().item() <= TOLERANCE

    llama = _upcycled(tiny_spec())
    llama.save(tmp_path / "llama-moe")
    assert main(["model", "export-native", str(tmp_path / "llama-moe"), str(tmp_path / "x")]) == 2
    assert "llm: the native MoE export needs a qwen2 LLM" in capsys.readouterr().err
