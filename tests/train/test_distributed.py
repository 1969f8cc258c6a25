"""Distributed training on CPU with gloo: DDP parity, FSDP2 sharding with mixed text-only/image batches.

FSDP2 through Trainer cannot run on CPU: Accelerate 1.15 enables FSDP (and DeepSpeed) only for accelerator
process groups and would silently fall back to DDP, so medtune refuses ``fsdp2`` on a multi-process CPU run
(tested below). FSDP2 itself (``torch.distributed.fsdp.fully_shard``) works on CPU with gloo, so the sharded
behaviours medtune is responsible for (every rank runs the vision tower every step; a full checkpoint gathered
from the shards loads in one process) are tested on it directly.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

TRAIN_VERB = ("import argparse, sys; from medtune.train import cli; parser = argparse.ArgumentParser(); "
              "cli.register(parser.add_subparsers()); args = parser.parse_args(sys.argv[1:]); "
              "sys.exit(args.func(args))")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(script: Path, *args: str, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={free_port()}", str(script), *args]
    return subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=timeout)


def write_recipe(tmp_path: Path) -> Path:
    recipe = {
        "model": {"preset": "tiny"}, "output_dir": str(tmp_path / "unused"), "report_to": ["none"], "seed": 1,
        "cache_dir": str(tmp_path / "cache"),
        "stages": [{"name": "sft", "data": {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad",
                                            "limit": 32},
                    "lr": {"projector": 1e-3, "llm": 1e-3}, "max_steps": 4, "batch_size": 2, "save_steps": 4,
                    "log_steps": 1, "max_length": 256}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(output: Path) -> list[float]:
    lines = (output / "stage-0-sft" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def test_ddp_two_processes_equal_one_process_with_double_accumulation(tmp_path):
    from safetensors.torch import load_file

    recipe, script = write_recipe(tmp_path), tmp_path / "train.py"
    script.write_text(TRAIN_VERB.replace("; ", "\n"))
    done = torchrun(script, "train", str(recipe), "--output", str(tmp_path / "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), "train", str(recipe), "--output", str(tmp_path / "one"),
                             "stages.0.grad_accum=2"], env=environment(), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    # Same samples per optimizer step (rank r takes every other micro-batch of the one seeded order), loss
    # normalised by the tokens of the whole step in both: equal up to float summation order.
    ddp_losses, one_losses = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert len(ddp_losses) == 4
    assert ddp_losses == pytest.approx(one_losses, abs=1e-5)
    ddp = load_file(tmp_path / "ddp" / "stage-0-sft" / "model" / "model.safetensors")
    one = load_file(tmp_path / "one" / "stage-0-sft" / "model" / "model.safetensors")
    assert all(torch.allclose(ddp[name], one[name], atol=1e-6) for name in one)
    summary = json.loads((tmp_path / "ddp" / "stage-0-sft" / "summary.json").read_text())
    assert summary["tokens"] == json.loads((tmp_path / "one" / "stage-0-sft" / "summary.json").read_text())["tokens"]


def test_fsdp2_through_trainer_on_cpu_is_refused_not_silently_ddp(tmp_path, monkeypatch):
    from medtune.train.recipe import RecipeError, check_environment, load_recipe

    recipe = load_recipe(write_recipe(tmp_path), ["distributed.strategy=fsdp2"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="fsdp2 needs GPUs"):
        check_environment(recipe, device="cpu")


# Each rank: rank 0 trains on text-only samples, rank 1 on image samples, under FSDP2. Without a vision pass on
# rank 0, rank 1 would wait forever in the vision tower's all-gather (the subprocess timeout turns that into a
# failure). Writes per-rank losses and, from rank 0, the full model gathered from the shards.
FSDP_WORKER = r'''
import json, sys, torch, torch.distributed as dist
from pathlib import Path
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from medtune.models.build import build_vlm
from medtune.models.presets import tiny_spec
from worker_batches import batches

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
vlm = build_vlm(tiny_spec())
model = vlm.model.train()
mine = batches(vlm)[rank]
with torch.no_grad():
    plain = model(**mine["plain"]).loss.item()          # unsharded, no blank image: the reference loss
for layer in [*model.model.language_model.layers, *model.model.vision_tower.encoder.layers]:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
collate = vlm.collator()
history = []
for step in range(2):
    loss = model(**collate(mine["features"])).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    history.append(loss.item())
(out / f"rank{rank}.json").write_text(json.dumps({"plain": plain, "losses": history}))
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    vlm.model.save_pretrained(out / "model", state_dict=state)
    vlm.tokenizer.save_pretrained(out / "model")
dist.barrier()
dist.destroy_process_group()
'''

# Shared by the workers and the single-process reference: two text-only samples (rank 0), two VQA-RAD image
# samples (rank 1).
WORKER_BATCHES = r'''
import itertools
from medtune.data.formats import default_image_root, read_records
from medtune.data.jsonl import Tally
from medtune.data.schema import qa_sample
from medtune.paths import bundled_data
from medtune.models.collate import PadCollator

def batches(vlm):
    path = bundled_data("vqa_rad", "trainset.json")
    root = default_image_root("vqa-rad", path)
    images = [vlm.encode_sample(s, root, max_length=256)
              for s in itertools.islice(read_records("vqa-rad", path, tally=Tally()), 2)]
    texts = [vlm.encode_sample(qa_sample(f"t{i}", q, a), root, max_length=256)
             for i, (q, a) in enumerate([("What is a CT scan?", "An x-ray tomography"), ("Define edema", "Swelling")])]
    pad = PadCollator(vlm.tokenizer.pad_token_id)
    return [{"features": feats, "plain": pad(feats)} for feats in (texts, images)]
'''


@pytest.fixture
def one_torch_thread():
    """torchrun runs each worker with OMP_NUM_THREADS=1; a reference computed here sums in the same order only
    with one thread too (Adam turns last-bit differences of near-zero gradients into lr-sized steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fsdp2_mixed_text_and_image_ranks_train_and_the_full_checkpoint_loads_in_one_process(tmp_path,
                                                                                              one_torch_thread):
    from medtune.models.build import build_vlm
    from medtune.models.presets import tiny_spec
    
    (tmp_path / "worker.py").write_text(FSDP_WORKER)
    (tmp_path / "worker_batches.py").write_text(WORKER_BATCHES)
    done = torchrun(tmp_path / "worker.py", str(tmp_path), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # the blank image that keeps rank 0's vision tower busy does not change its loss
    assert ranks[0]["losses"][0] == pytest.approx(ranks[0]["plain"], abs=1e-5)

    # one process doing what the two ranks did together: FSDP averages the ranks' gradients
    sys.path.insert(0, str(tmp_path))
    try:
        from worker_batches import batches
    finally:
        sys.path.remove(str(tmp_path))
    vlm = build_vlm(tiny_spec())
    model = vlm.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    collate = vlm.collator()
    both = batches(vlm)
    for step in range(2):
        step_losses = [model(**collate(rank_batch["features"])).loss for rank_batch in both]
        (sum(step_losses) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        for rank in (0, 1):
            assert step_losses[rank].item() == pytest.approx(ranks[rank]["losses"][step], abs=1e-5)

    from transformers import AutoModelForImageTextToText

    sharded_then_gathered = AutoModelForImageTextToText.from_pretrained(tmp_path / "model")
    gathered = dict(sharded_then_gathered.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.allclose(gathered[name], parameter, atol=1e-5), name
