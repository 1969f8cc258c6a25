"""Recipe validation: every mistake fails before any work, with the key path and a reason."""
from __future__ import annotations

import pytest
import yaml

from medtune.train.recipe import RecipeError, apply_overrides, load_recipe, make_tiny, parse_recipe


def minimal(**stage_changes) -> dict:
    stage = {"name": "align", "data": {"path": "captions.jsonl"}, "lr": {"projector": 2e-3}}
    stage.update(stage_changes)
    return {"model": "some/model", "output_dir": "runs/x", "stages": [stage]}


def error_of(raw: dict) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw)
    return str(info.value)


def test_valid_recipe_gets_defaults_and_typed_values():
    raw = minimal()
    raw["stages"][0]["lr"]["projector"] = "2e-3"   # YAML reads 2e-3 without a dot as a string
    recipe = parse_recipe(raw)
    stage = recipe.stages[0]
    assert stage.lr.projector == pytest.approx(2e-3) and stage.lr.llm == 0.0
    assert stage.schedule == "cosine" and stage.precision == "fp32" and stage.lora is None
    assert recipe.report_to == ["tensorboard"]


def test_unknown_key_is_named_with_a_suggestion():
    raw = minimal()
    raw["stages"].append({"name": "sft", "data": {"path": "x"}, "lr": {"projectr": 1e-4}})
    assert error_of(raw) == "stages[1].lr.projectr: unknown key (did you mean projector?)"


@pytest.mark.parametrize("change, message", [
    ({"batch_size": "4"}, "stages[0].batch_size: expected an integer, got str '4'"),
    ({"batch_size": True}, "stages[0].batch_size: expected an integer, got bool True"),
    ({"precision": "fp16"}, "stages[0].precision: 'fp16' is not one of fp32, bf16"),
    ({"packing": "yes"}, "stages[0].packing: expected true, false or one of position_ids, mask, flatten, got str 'yes'"),
    ({"data": "captions.jsonl"}, "stages[0].data: expected a mapping, got str 'captions.jsonl'"),
    ({"lr": {"llm": 1e-3, "experts": 1e-3}, "moe": {"num_experts": "4"}},
     "stages[0].moe.num_experts: expected an integer, got str '4'"),
    ({"lr": {"llm": 1e-3, "experts": 1e-3}, "moe": {"layers": [0, "a"]}},
     "stages[0].moe.layers: expected a string or a list, got list [0, 'a']"),
    ({"lr": {"llm": 1e-3, "experts": 1e-3}, "moe": {"shared_expert": 1}},
     "stages[0].moe.shared_expert: expected true or false, got int 1"),
    ({"router": {"epochs": 2.5}}, "stages[0].router.epochs: expected an integer, got float 2.5"),
    ({"lora": {"r": 8, "target_modules": ["q_proj", 3]}, "lr": {"lora": 1e-3}},
     "stages[0].lora.target_modules[1]: expected a string, got int 3"),
])
def test_wrong_types_name_the_key(change, message):
    assert error_of(minimal(**change)) == message


@pytest.mark.parametrize("change, key", [
    ({"lr": {"projector": 0}}, "stages[0].lr: every part is frozen"),
    ({"lr": {"llm": 1e-5, "lora": 1e-4}, "lora": {"r": 8}}, "stages[0].lr.llm: full fine-tuning of the LLM"),
    ({"lr": {"projector": 1e-4}, "lora": {"r": 8}}, "stages[0].lr.lora: the stage has a lora section"),
    ({"lr": {"lora": 1e-4}}, "stages[0].lr.lora: set to 0.0001 but the stage has no lora section"),
    ({"lr": {"vision": 1e-5, "lora": 1e-4}, "lora": {"on_vision": True}}, "stages[0].lr.vision:"),
    ({"packing": True, "group_by_length": True}, "stages[0].group_by_length: cannot be combined with packing"),
    ({"group_by_length": 0}, "stages[0].group_by_length: 0 batches per mega-batch; give at least 1"),
    ({"lr": {"projector": -1.0}}, "stages[0].lr.projector: a learning rate cannot be negative"),
    ({"data": {"path": "a", "mixture": "m.yaml"}}, "stages[0].data: give exactly one of path"),
    ({"eval_steps": 10}, "stages[0].eval_steps: needs eval_data"),
    ({"max_steps": 0}, "stages[0].max_steps: must be at least 1"),
])
def test_impossible_combinations_fail_naming_the_key(change, key):
    assert error_of(minimal(**change)).startswith(key)


def test_missing_and_duplicate_keys():
    raw = minimal()
    del raw["output_dir"]
    assert error_of(raw) == "output_dir: required key is missing"
    raw = minimal()
    raw["stages"].append(dict(raw["stages"][0]))
    assert error_of(raw).startswith("stages[1].name: stage names must be unique")


def test_defaults_merge_under_every_stage_and_are_checked():
    raw = minimal()
    raw["defaults"] = {"max_length": 512, "lr": {"vision": 1e-5}}
    recipe = parse_recipe(raw)
    assert recipe.stages[0].max_length == 512
    assert (recipe.stages[0].lr.vision, recipe.stages[0].lr.projector) == (1e-5, 2e-3)
    raw["defaults"] = {"max_lenght": 512}
    assert error_of(raw) == "defaults.max_lenght: unknown key (did you mean max_length?)"


def test_overrides_address_dotted_paths_and_every_stage():
    raw = minimal()
    raw["stages"].append({"name": "sft", "data": {"path": "x"}, "lr": {"llm": 2e-5}})
    out = apply_overrides(raw, ["stages.1.max_steps=3", "stages.*.lr.projector=0.5", "seed=7"])
    assert out["stages"][1]["max_steps"] == 3 and out["seed"] == 7
    assert [s["lr"]["projector"] for s in out["stages"]] == [0.5, 0.5]
    assert raw["stages"][1].get("max_steps") is None   # the input is not modified
    with pytest.raises(RecipeError, match="'5' is not an index of a list of 2 items"):
        apply_overrides(raw, ["stages.5.max_steps=3"])
    with pytest.raises(RecipeError, match="expected key=value"):
        apply_overrides(raw, ["stages.0.max_steps"])


def test_override_typos_are_caught_like_file_typos(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["stages.0.max_stepz=3"])
    assert str(info.value) == f"{path}: stages[0].max_stepz: unknown key (did you mean max_steps?)"


def test_tiny_keeps_what_trains_and_swaps_model_data_and_steps(tmp_path):
    raw = minimal(lora={"r": 64, "quantize": "4bit"}, lr={"projector": 2e-5, "lora": 2e-4})
    raw["model"] = {"projector": "attn_pool_mlp2x_gelu", "template": "llava_llama_2", "llm": "meta/llama"}
    raw["distributed"] = {"strategy": "zero3"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path, ["tiny=true"])
    stage = recipe.stages[0]
    assert recipe.model == {"preset": "tiny", "projector": "attn_pool_mlp2x_gelu", "template": "llava_llama_2"}
    assert stage.max_steps == 2 and stage.data.format == "vqa-rad" and stage.data.limit == 16
    assert stage.lr.lora == 2e-4 and stage.lora.r == 4 and stage.lora.quantize is None
    assert recipe.distributed.strategy == "ddp"
    assert make_tiny(raw)["stages"][0]["data"]["path"].startswith("bundled:")


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "nope.yaml")
    path = tmp_path / "r.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_environment_checks_bf16_qlora_and_deepspeed(monkeypatch):
    from medtune.train import recipe as recipe_module

    recipe = parse_recipe(minimal(precision="bf16"))
    monkeypatch.setattr(recipe_module, "bf16_supported", lambda device: False)
    with pytest.raises(RecipeError, match=r"stages\[0\].precision: bf16 is not supported on this cpu"):
        recipe_module.check_environment(recipe, device="cpu")
    recipe = parse_recipe(minimal(lr={"lora": 1e-4}, lora={"quantize": "4bit"}))
    with pytest.raises(RecipeError, match=r"stages\[0\].lora.quantize: QLoRA needs a CUDA GPU"):
        recipe_module.check_environment(recipe, device="cpu")
    raw = minimal()
    raw["distributed"] = {"strategy": "zero3"}
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(RecipeError, match="needs DeepSpeed, an optional extra"):
        recipe_module.check_environment(parse_recipe(raw), device="cpu")


def test_distributed_strategy_becomes_trainer_arguments_only_with_several_processes(monkeypatch):
    from medtune.train.run import distributed_arguments

    raw = minimal()
    raw["distributed"] = {"strategy": "zero3"}
    recipe = parse_recipe(raw)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed_arguments(recipe, None) == {}
    monkeypatch.setenv("LOCAL_RANK", "0")   # torchrun with one process (one GPU): the engine still runs
    assert distributed_arguments(recipe, None)["deepspeed"]["zero_optimization"]["stage"] == 3
    monkeypatch.setenv("WORLD_SIZE", "8")
    zero = distributed_arguments(recipe, None)["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    raw["distributed"] = {"strategy": "fsdp2", "fsdp_config": {"cpu_offload": True}}
    fsdp = distributed_arguments(parse_recipe(raw), None)
    assert fsdp["fsdp_config"]["version"] == 2 and fsdp["fsdp_config"]["cpu_offload"] is True
    assert fsdp["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"   # checkpoints load in one process
    raw["distributed"] = {"strategy": "zero2", "deepspeed_config": "my_ds.json"}
    assert distributed_arguments(parse_recipe(raw), None) == {"deepspeed": "my_ds.json"}


@pytest.mark.parametrize("model, message", [
    ({"preset": "tiny", "projecter": "linear"}, "model.projecter: unknown key (did you mean projector?)"),
    ({"preset": "huge"}, "model.preset: 'huge' is not one of tiny, small"),
    ({"vision": "openai/clip-vit-large-patch14"}, "model: a composed model needs vision and llm"),
])
def test_model_spec_keys_are_checked_before_building(model, message):
    from medtune.train.recipe import check_environment

    raw = minimal()
    raw["model"] = model
    with pytest.raises(RecipeError) as info:
        check_environment(parse_recipe(raw), device="cpu")
    assert str(info.value).startswith(message)


def test_every_problem_of_a_recipe_is_reported_at_once(tmp_path):
    """Typos, wrong types and impossible combinations across sections and stages come in one error, each with
    its key path, so one run of `medtune train` shows everything to fix."""
    raw = minimal(lr={"projectr": 1e-3}, batch_size="4")
    raw["seed"] = "zero"
    raw["report_to"] = ["tensorbord"]
    raw["stages"].append({"name": "sft", "data": {"path": "x"}, "lr": {"lora": 1e-4}, "max_steps": 0})
    raw["stages"].append({"name": "sft", "data": {"path": "x", "mixture": "m.yaml"}, "lr": {"llm": 1e-5}})
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw)
    expected = [
        "stages[0].lr.projectr: unknown key (did you mean projector?)",
        "stages[0].batch_size: expected an integer, got str '4'",
        "stages[1].lr.lora: set to 0.0001 but the stage has no lora section",
        "stages[1].max_steps: must be at least 1",
        "stages[2].name: stage names must be unique, non-empty and contain no '/'",
        "stages[2].data: give exactly one of path (a data file) or mixture",
        "seed: expected an integer, got str 'zero'",
        "report_to: 'tensorbord' is not one of tensorboard, wandb, mlflow, none",
    ]
    assert sorted(info.value.problems) == sorted(expected)
    message = str(info.value)
    assert message.splitlines()[0] == f"{len(expected)} problems:" and all(f"  {p}" in message for p in expected)
    # through a file, every line keeps its key path after the file name
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: {len(expected)} problems:\n  ")


def test_environment_problems_come_together(monkeypatch):
    from medtune.train import recipe as recipe_module

    raw = minimal(precision="bf16", lr={"lora": 1e-4}, lora={"quantize": "4bit"})
    raw["model"] = {"preset": "tiny", "projecter": "linear"}
    monkeypatch.setattr(recipe_module, "bf16_supported", lambda device: False)
    with pytest.raises(RecipeError) as info:
        recipe_module.check_environment(parse_recipe(raw), device="cpu")
    assert [p.split(":")[0] for p in info.value.problems] == [
        "model.projecter", "stages[0].precision", "stages[0].lora.quantize"]


def test_data_format_is_a_known_name_or_detected_from_the_content():
    assert parse_recipe(minimal()).stages[0].data.format is None   # not given: read from the file's content
    assert error_of(minimal(data={"path": "x.json", "format": "vqa_rad"})) == (
        "stages[0].data.format: unknown data format 'vqa_rad' (did you mean vqa-rad?)")


def test_a_stage_without_format_reads_the_same_samples_as_one_naming_it():
    from medtune.data.jsonl import Tally
    from medtune.train.data import iter_stage_samples

    def samples(**fmt):
        spec = parse_recipe(minimal(data={"path": "bundled:vqa_rad/trainset.json", "limit": 50, **fmt})).stages[0]
        return [(sample, str(root)) for sample, root in iter_stage_samples(spec.data, Tally())]

    named = samples(format="vqa-rad")
    assert len(named) == 50 and samples() == named
