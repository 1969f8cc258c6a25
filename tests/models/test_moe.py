"""MoE building blocks: routing, dropless dispatch and capacity, the two expert inits (faithful (1 + p)·FFN and
function-preserving), layer choice, agreement of the experts implementations, per-expert checkpoint keys,
router files, router losses and statistics, and LoRA on the fused expert weights."""
from __future__ import annotations

import copy
import json
import math

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM  # noqa: E402

from medtune.models.moe.layers import (  # noqa: E402
    MoEBlock,
    MoEExperts,
    MoESettings,
    auxiliary_losses,
    build_layers,
    load_router,
    moe_blocks,
    register_checkpoint_layout,
    routing_counts,
    save_router,
    set_experts_implementation,
    upcycle_layers,
)

torch.set_num_threads(1)

HIDDEN, INTERMEDIATE, VOCAB = 32, 64, 64
IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def tiny_llama(layers: int = 4, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, **overrides)
    return LlamaForCausalLM(config).eval()


def tiny_phi(layers: int = 2, seed: int = 0) -> PhiForCausalLM:
    torch.manual_seed(seed)
    config = PhiConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                       num_attention_heads=4, hidden_act="gelu_new")
    return PhiForCausalLM(config).eval()


def token_ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def settings(**changes) -> MoESettings:
    """Med-MoE's settings with ``changes``."""
    return MoESettings.preset("med-moe", **changes)


def hidden_states(tokens: int = 24, seed: int = 2) -> torch.Tensor:
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- settings


def test_med_moe_preset_is_med_moes_stage_3():
    preset = MoESettings.preset("med-moe")
    assert (preset.layers, preset.every, preset.offset) == ("sparse", 2, 0)
    assert (preset.num_experts, preset.top_k) == (4, 1)
    assert preset.shared_expert and not preset.shared_expert_gate and not preset.renormalize
    assert preset.capacity_factor is None and preset.aux_loss_coef == 0 and preset.z_loss_coef == 0
    assert preset.init == "faithful" and preset.expert_noise == 0 and preset.router_bias
    assert preset.layer_indices(24) == list(range(0, 24, 2))   # StableLM-2-1.6B: 12 MoE layers


def test_settings_round_trip_through_json_and_reject_unknown_keys():
    original = settings(layers=[1, 3], capacity_factor=1.5, z_loss_coef=1e-3)
    assert MoESettings.from_dict(json.loads(json.dumps(original.to_dict()))) == original
    with pytest.raises(ValueError, match="experts_per_token"):
        MoESettings.from_dict({"experts_per_token": 2})


@pytest.mark.parametrize(("field", "value"), [
    ("layers", "every_other"), ("layers", []), ("layers", [0, 0]), ("every", 0), ("offset", -1),
    ("num_experts", 0), ("top_k", 5), ("capacity_factor", 0), ("aux_loss_coef", -1.0), ("z_loss_coef", math.inf),
    ("expert_noise", -0.1), ("init", "copy"), ("experts_implementation", "loop"), ("shared_expert_gate", True),
])
def test_each_bad_setting_is_refused_naming_its_field(field, value):
    changes = {field: value}
    if field == "shared_expert_gate":
        changes["shared_expert"] = False   # a gate with nothing to gate
    with pytest.raises(ValueError, match=field):
        settings(**changes)


def test_layer_choice_of_each_mode():
    assert settings(layers="sparse").layer_indices(8) == [0, 2, 4, 6]
    assert settings(layers="sparse", every=3, offset=1).layer_indices(8) == [1, 4, 7]
    assert settings(layers="first_half").layer_indices(8) == [0, 1, 2, 3]
    assert settings(layers="second_half").layer_indices(8) == [4, 5, 6, 7]
    assert settings(layers="dense").layer_indices(8) == list(range(8))
    assert settings(layers=[5, 1]).layer_indices(8) == [1, 5]
    with pytest.raises(ValueError, match=r"\b8\b"):
        settings(layers=[1, 8]).layer_indices(8)


@pytest.mark.parametrize(("layers", "expected"), [
    ("sparse", [0, 2]), ("first_half", [0, 1]), ("second_half", [2, 3]), ("dense", [0, 1, 2, 3]), ([3], [3]),
])
def test_upcycling_converts_exactly_the_chosen_layers(layers, expected):
    model = tiny_llama(layers=4)
    assert upcycle_layers(model.model.layers, settings(layers=layers), HIDDEN) == expected
    converted = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoEBlock)]
    assert converted == expected
    assert [name for name, _ in moe_blocks(model)] == [f"model.layers.{i}.mlp" for i in expected]


def test_a_bad_layer_index_or_ffn_leaves_the_model_unchanged():
    model = tiny_llama(layers=4)
    with pytest.raises(ValueError, match=r"\b4\b"):
        upcycle_layers(model.model.layers, settings(layers=[0, 4]), HIDDEN)
    model.model.layers[2].mlp = nn.Sequential(nn.Linear(HIDDEN, HIDDEN))
    with pytest.raises(ValueError, match="Sequential"):
        upcycle_layers(model.model.layers, settings(layers=[0, 2]), HIDDEN)
    assert not moe_blocks(model)   # every layer is checked before any is converted
    upcycle_layers(model.model.layers, settings(layers=[0]), HIDDEN)
    with pytest.raises(ValueError, match="already an MoEBlock"):
        upcycle_layers(model.model.layers, settings(layers=[0]), HIDDEN)


# ------------------------------------------------------------------------------------------ routing and inits


class HandFFN(nn.Module):
    """A 2-wide SwiGLU FFN with identity projections: FFN(x) = silu(x) * x, element by element."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
        self.down_proj = nn.Linear(2, 2, bias=False)
        for linear in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.eye_(linear.weight)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_faithful_init_gives_one_plus_p_times_the_ffn_on_a_hand_checked_example():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.5, 0.0])
    # eager: grouped_mm needs rows of a multiple of 16 bytes, which a 2-wide float32 example is not
    block = MoEBlock.from_dense(HandFFN(), settings(init="faithful", experts_implementation="eager"), 2,
                                router_state={"weight": weight, "bias": bias})
    x = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [0.0, 0.0]])
    with torch.no_grad():
        output = block(x.unsqueeze(0)).squeeze(0)
    # logits W x + b by hand: [1, 0, .5, -1], [-1, 2, .5, 1], [0, 0, .5, 0]; chosen experts 0, 1, 2
    hand_logits = [[1, 0, 0.5, -1], [-1, 2, 0.5, 1], [0, 0, 0.5, 0]]
    assert torch.equal(block.router_logits, torch.tensor(hand_logits))
    for token, logits in enumerate(hand_logits):
        p = math.exp(max(logits)) / sum(math.exp(v) for v in logits)
        ffn = [v * v / (1 + math.exp(-v)) for v in x[token].tolist()]          # silu(v) * v
        expected = torch.tensor([(1 + p) * f for f in ffn])
        torch.testing.assert_close(output[token], expected, rtol=0, atol=1e-6)


def test_top1_sends_every_token_to_exactly_one_routed_expert():
    ffn = tiny_llama(layers=1).model.layers[0].mlp
    block = MoEBlock.from_dense(copy.deepcopy(ffn), settings(expert_noise=0.5, experts_implementation="eager"), HIDDEN)
    seen = {}
    block.experts.register_forward_pre_hook(lambda module, args: seen.update(index=args[1], weights=args[2]))
    x = hidden_states()
    with torch.no_grad():
        output = block(x.unsqueeze(0)).squeeze(0)
        probabilities = block.router_logits.softmax(-1)
        assert seen["index"].shape == (len(x), 1)
        assert torch.equal(seen["index"][:, 0], probabilities.argmax(-1))
        torch.testing.assert_close(seen["weights"][:, 0], probabilities.max(-1).values)
        experts = block.experts
        for token in range(len(x)):   # the output is the shared FFN plus that one expert, by its own weights
            e = int(seen["index"][token, 0])
            gate, up = (experts.gate_up_proj[e] @ x[token]).chunk(2)
            expert_out = experts.down_proj[e] @ (nn.functional.silu(gate) * up)
            expected = ffn(x[token]) + probabilities[token, e] * expert_out
            torch.testing.assert_close(output[token], expected, rtol=0, atol=1e-5)
    assert len(set(seen["index"][:, 0].tolist())) > 1   # the check covers several experts


def _all_to_expert_zero(block: MoEBlock) -> None:
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.bias.copy_(torch.tensor([8.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dropless_keeps_every_token_when_all_pick_one_expert(implementation):
    ffn = tiny_llama(layers=1).model.layers[0].mlp
    block = MoEBlock.from_dense(copy.deepcopy(ffn), settings(experts_implementation=implementation, expert_noise=0.3),
                                HIDDEN)
    _all_to_expert_zero(block)
    x = hidden_states(tokens=40)
    with torch.no_grad():
        output = block(x.unsqueeze(0)).squeeze(0)
        p = block.router_logits.softmax(-1)[:, 0]
        expert_zero = block.experts._expert(0, x)
        torch.testing.assert_close(output, ffn(x) + p[:, None] * expert_zero, rtol=0, atol=1e-5)
    assert block.dropped_tokens == 0


def test_capacity_factor_drops_the_overflow_and_counts_it():
    ffn = tiny_llama(layers=1).model.layers[0].mlp
    block = MoEBlock.from_dense(copy.deepcopy(ffn), settings(capacity_factor=1.0, expert_noise=0.3), HIDDEN)
    _all_to_expert_zero(block)
    x = hidden_states(tokens=40)
    capacity = math.ceil(1.0 * 40 * 1 / 4)
    with torch.no_grad():
        output = block(x.unsqueeze(0)).squeeze(0)
        p = block.router_logits.softmax(-1)[:, 0]
        kept = ffn(x[:capacity]) + p[:capacity, None] * block.experts._expert(0, x[:capacity])
        torch.testing.assert_close(output[:capacity], kept, rtol=0, atol=1e-5)
        torch.testing.assert_close(output[capacity:], ffn(x[capacity:]), rtol=0, atol=1e-6)  # shared expert only
    assert block.dropped_tokens == 40 - capacity
    with torch.no_grad():
        block(x.unsqueeze(0))
    assert block.dropped_tokens == 2 * (40 - capacity)   # cumulative
    block.reset_dropped_tokens()
    assert block.dropped_tokens == 0


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("gated_shared_expert", [False, True])
def test_preserving_init_keeps_the_dense_llama_logits_exactly(top_k, gated_shared_expert):
    model, ids = tiny_llama(layers=4), token_ids()
    dense = logits_of(model, ids)
    chosen = settings(init="preserving", top_k=top_k, shared_expert_gate=gated_shared_expert, expert_noise=0.1)
    upcycle_layers(model.model.layers, chosen, HIDDEN)
    for implementation in IMPLEMENTATIONS:
        set_experts_implementation(model, implementation)
        assert torch.equal(logits_of(model, ids), dense), implementation   # routed output is exactly 0
    faithful = tiny_llama(layers=4)
    upcycle_layers(faithful.model.layers, settings(init="faithful", top_k=top_k), HIDDEN)
    assert not torch.allclose(logits_of(faithful, ids), dense, atol=1e-3)


@pytest.mark.parametrize("top_k", [1, 2])
def test_preserving_init_without_a_shared_expert_renormalises_identical_copies(top_k):
    model, ids = tiny_llama(layers=2), token_ids()
    dense = logits_of(model, ids)
    upcycle_layers(model.model.layers, settings(init="preserving", top_k=top_k, shared_expert=False, renormalize=True),
                   HIDDEN)
    # sum_k w_k FFN(x) with sum_k w_k = 1: equal up to the rounding of the weights' sum and of the fused matmuls
    torch.testing.assert_close(logits_of(model, ids), dense, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="renormalize"):
        upcycle_layers(tiny_llama(layers=2).model.layers, settings(init="preserving", shared_expert=False), HIDDEN)


def test_preserving_experts_still_learn():
    model, ids = tiny_llama(layers=2), token_ids()
    upcycle_layers(model.model.layers, settings(init="preserving"), HIDDEN)
    model(ids, labels=ids).loss.backward()
    experts = model.model.layers[0].mlp.experts
    # down projections start at zero but their inputs (the FFN copies' activations) do not: they get gradient
    assert experts.down_proj.grad.abs().sum() > 0
    assert torch.count_nonzero(experts.down_proj) == 0


def test_phi_style_ffn_upcycles_and_preserving_keeps_its_logits():
    model, ids = tiny_phi(layers=2), token_ids()
    dense = logits_of(model, ids)
    upcycle_layers(model.model.layers, settings(init="preserving", top_k=2), HIDDEN)
    experts = model.model.layers[0].mlp.experts
    names = {name: tuple(p.shape) for name, p in experts.named_parameters(recurse=False)}
    assert names == {"up_proj": (4, INTERMEDIATE, HIDDEN), "up_proj_bias": (4, INTERMEDIATE),
                     "down_proj": (4, HIDDEN, INTERMEDIATE), "down_proj_bias": (4, HIDDEN)}
    assert model.model.layers[0].mlp.ffn_layout == "fc"
    assert torch.equal(logits_of(model, ids), dense)
    faithful = tiny_phi(layers=2)
    upcycle_layers(faithful.model.layers, settings(init="faithful"), HIDDEN)
    assert not torch.allclose(logits_of(faithful, ids), dense, atol=1e-3)
    # the faithful copies carry the FFN's biases
    fc1 = faithful.model.layers[0].mlp.shared_expert.fc1
    assert torch.equal(faithful.model.layers[0].mlp.experts.up_proj_bias[3], fc1.bias)


@pytest.mark.parametrize("host", ["llama", "llama_mlp_bias", "phi"])
def test_experts_implementations_agree_forward_and_backward(host):
    ffn = {"llama": lambda: tiny_llama(layers=1), "llama_mlp_bias": lambda: tiny_llama(layers=1, mlp_bias=True),
           "phi": lambda: tiny_phi(layers=1)}[host]().model.layers[0].mlp
    reference = MoEBlock.from_dense(ffn, settings(top_k=2, expert_noise=0.5), HIDDEN)
    x = hidden_states(tokens=30)
    results = {}
    for implementation in IMPLEMENTATIONS:
        block = copy.deepcopy(reference)
        block.experts.experts_implementation = implementation
        inputs = x.clone().requires_grad_(True)
        output = block(inputs.unsqueeze(0))
        output.square().sum().backward()
        results[implementation] = [output, inputs.grad] + [p.grad for p in block.parameters()]
    for implementation in ("grouped_mm", "batched_mm"):
        for got, expected in zip(results[implementation], results["eager"], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_bfloat16_block_routes_in_float32_and_its_implementations_agree():
    ffn = tiny_llama(layers=1).model.layers[0].mlp.to(torch.bfloat16)
    block = MoEBlock.from_dense(ffn, settings(top_k=2, expert_noise=0.5), HIDDEN)
    assert block.gate.weight.dtype == block.experts.down_proj.dtype == torch.bfloat16
    x = hidden_states(tokens=30).to(torch.bfloat16)
    outputs = {}
    with torch.no_grad():
        for implementation in IMPLEMENTATIONS:
            block.experts.experts_implementation = implementation
            outputs[implementation] = block(x.unsqueeze(0)).float()
            assert block.router_logits.dtype == torch.float32
    for implementation in ("grouped_mm", "batched_mm"):
        torch.testing.assert_close(outputs[implementation], outputs["eager"], rtol=2e-2, atol=2e-2)


def test_empty_blocks_have_the_structure_of_upcycled_ones():
    upcycled, built = tiny_llama(layers=2), tiny_llama(layers=2)
    chosen = settings(layers="dense", shared_expert_gate=True)
    upcycle_layers(upcycled.model.layers, chosen, HIDDEN)
    build_layers(built.model.layers, chosen, HIDDEN)
    shapes = {name: p.shape for name, p in upcycled.state_dict().items()}
    assert shapes == {name: p.shape for name, p in built.state_dict().items()}


# -------------------------------------------------------------------------------------------- checkpoints


class MoETestLlamaForCausalLM(LlamaForCausalLM):
    """A host model whose layers get their experts from ``config.moe`` (as medtune's MoE model classes do)."""

    def __init__(self, config):
        super().__init__(config)
        build_layers(self.model.layers, MoESettings.from_dict(config.moe), config.hidden_size)


class MoETestPhiForCausalLM(PhiForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        build_layers(self.model.layers, MoESettings.from_dict(config.moe), config.hidden_size)


@pytest.mark.parametrize("host", ["llama", "phi"])
def test_save_pretrained_writes_one_key_per_expert_and_reloads_identically(host, tmp_path):
    from safetensors import safe_open

    if host == "llama":
        model, model_class, layout = tiny_llama(layers=3, mlp_bias=True), MoETestLlamaForCausalLM, "gated"
        per_expert = ["gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias", "down_proj.weight",
                      "down_proj.bias"]
        shared = "gate_proj.weight"
    else:
        model, model_class, layout = tiny_phi(layers=3), MoETestPhiForCausalLM, "fc"
        per_expert, shared = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], "fc1.weight"
    register_checkpoint_layout(model_class.__name__, layout)
    chosen = settings(expert_noise=0.5)   # experts that differ, so a swapped expert would show
    upcycle_layers(model.model.layers, chosen, HIDDEN)
    config = copy.deepcopy(model.config)
    config.moe = chosen.to_dict()
    upcycled = model
    model = model_class(config).eval()   # the MoE class, holding the upcycled weights
    model.load_state_dict(upcycled.state_dict(), strict=True)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        expected = {f"model.layers.{layer}.mlp.experts.{e}.{name}" for layer in (0, 2) for e in range(4)
                    for name in per_expert}
        assert expected <= keys
        assert handle.get_tensor("model.layers.2.mlp.experts.3.down_proj.weight" if layout == "gated" else
                                 "model.layers.2.mlp.experts.3.fc2.weight").shape == (HIDDEN, INTERMEDIATE)
    assert not any(key.endswith(("gate_up_proj", "experts.up_proj", "experts.down_proj")) for key in keys)
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.gate.bias",
            f"model.layers.0.mlp.shared_expert.{shared}"} <= keys
    loaded = model_class.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.layers[2].mlp, MoEBlock) and not isinstance(loaded.model.layers[1].mlp, MoEBlock)
    ids = token_ids()
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))


def test_a_class_holds_one_expert_layout():
    register_checkpoint_layout("MoETestLayoutModel", "gated")
    register_checkpoint_layout("MoETestLayoutModel", "gated")   # again: nothing changes
    with pytest.raises(ValueError, match="gated"):
        register_checkpoint_layout("MoETestLayoutModel", "fc")


# --------------------------------------------------------------------------------------------- router files


def test_router_files_round_trip_and_med_moe_pth_files_load(tmp_path):
    weight, bias = torch.randn(4, HIDDEN), torch.randn(4)
    save_router(tmp_path / "router.safetensors", weight, bias)
    state = load_router(tmp_path / "router.safetensors", num_experts=4, hidden_size=HIDDEN)
    assert torch.equal(state["weight"], weight) and torch.equal(state["bias"], bias)
    # Med-MoE's router file: torch.save(mlp.state_dict()) of a module whose Linear is called fc1
    torch.save({"fc1.weight": weight, "fc1.bias": bias}, tmp_path / "phi_router.pth")
    state = load_router(tmp_path / "phi_router.pth")
    assert torch.equal(state["weight"], weight) and torch.equal(state["bias"], bias)
    model = tiny_llama(layers=4)
    upcycle_layers(model.model.layers, settings(), HIDDEN, router_state=state)
    gates = [block.gate for _, block in moe_blocks(model)]
    assert all(torch.equal(gate.weight, weight) and torch.equal(gate.bias, bias) for gate in gates)
    assert gates[0].weight.data_ptr() != gates[1].weight.data_ptr()   # equal values, separate parameters


def test_bad_router_files_are_refused_naming_the_file(tmp_path):
    torch.save({"fc1.weight": torch.randn(4, HIDDEN), "fc1.bias": torch.randn(3)}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="shape.pth"):
        load_router(tmp_path / "shape.pth")
    save_router(tmp_path / "wide.safetensors", torch.randn(4, 2 * HIDDEN), torch.randn(4))
    with pytest.raises(ValueError, match="wide.safetensors.*hidden size"):
        load_router(tmp_path / "wide.safetensors", hidden_size=HIDDEN)
    torch.save({"router": torch.randn(4, HIDDEN)}, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match=r"keys.pth.*\['router'\]"):
        load_router(tmp_path / "keys.pth")
    torch.save({"fc1.weight": torch.randn(4, HIDDEN), "code": HandFFN()}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="pickle.pth.*unpickling"):   # weights_only: no object is rebuilt
        load_router(tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match=r"expected \(4, 32\)"):
        upcycle_layers(tiny_llama(layers=2).model.layers, settings(), HIDDEN,
                       router_state={"weight": torch.randn(3, HIDDEN), "bias": torch.randn(3)})


# --------------------------------------------------------------------------------- router losses and counts


def test_auxiliary_losses_match_transformers_balance_loss_and_the_z_loss_formula():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    model, ids = tiny_llama(layers=4), token_ids(batch=2, length=9)
    chosen = settings(top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001)
    upcycle_layers(model.model.layers, chosen, HIDDEN)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    model(ids, attention_mask=mask)
    losses = auxiliary_losses(model, chosen, attention_mask=mask)
    recorded = tuple(block.router_logits for _, block in moe_blocks(model))
    assert len(recorded) == 2 and recorded[0].shape == (18, 4) and recorded[0].dtype == torch.float32
    torch.testing.assert_close(losses["balance"], load_balancing_loss_func(recorded, 4, 2, mask))
    real = mask.reshape(-1).bool()
    z = torch.cat([logits[real].logsumexp(-1).square() for logits in recorded]).mean()
    torch.testing.assert_close(losses["z"], z)
    torch.testing.assert_close(losses["total"], 0.01 * losses["balance"] + 0.001 * losses["z"])
    unmasked = auxiliary_losses(model, chosen)
    torch.testing.assert_close(unmasked["balance"], load_balancing_loss_func(recorded, 4, 2))
    losses["total"].backward()   # the recorded logits keep their graph: the router losses train the router
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_routing_counts_count_each_groups_top_k_choices():
    model, ids = tiny_llama(layers=4), token_ids(batch=2, length=9)
    upcycle_layers(model.model.layers, settings(top_k=2, expert_noise=0.5), HIDDEN)
    logits_of(model, ids)
    groups = torch.tensor([[0] * 9, [2] * 5 + [-1] * 4])   # sample 0 is domain 0, sample 1 domain 2, padding ignored
    counts = routing_counts(model, groups)
    assert counts.shape == (2, 3, 4)
    assert counts.sum(dim=(1, 2)).tolist() == [(9 + 5) * 2] * 2   # every counted token, k choices each
    assert counts[:, 1].sum() == 0
    first = moe_blocks(model)[0][1].router_logits.softmax(-1).topk(2, -1).indices
    assert counts[0, 0].tolist() == torch.bincount(first[:9].reshape(-1), minlength=4).tolist()
    assert routing_counts(model, groups.reshape(-1), num_groups=5).shape == (2, 5, 4)


# ----------------------------------------------------------------------------------------------------- LoRA


def test_lora_on_the_fused_expert_weights_trains_and_merges_to_the_same_logits():
    from peft import LoraConfig, get_peft_model

    model, ids = tiny_llama(layers=2), token_ids()
    upcycle_layers(model.model.layers, settings(init="preserving"), HIDDEN)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], lora_dropout=0.0,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = get_peft_model(model, config)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and ".mlp.experts." in name for name in trainable)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(5):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peft_model.eval()
    adapted = logits_of(peft_model, ids)
    merged = peft_model.merge_and_unload()
    assert isinstance(merged.model.layers[0].mlp.experts, MoEExperts)
    torch.testing.assert_close(logits_of(merged, ids), adapted, rtol=0, atol=1e-5)
