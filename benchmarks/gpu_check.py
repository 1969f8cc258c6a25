"""The GPU path, verified in one run: packed attention, MFU, Trainer with FSDP2 / ZeRO, QLoRA, batched eval.

ONE prepared script for a CUDA machine (a lent device has minutes, not hours): every check is small, the whole
run is meant to take under 6 minutes on an H200, and it prints one table and exits non-zero when a check fails.
A check whose package is not installed (flash-attn, DeepSpeed, bitsandbytes) is skipped, and says why. It uses
the machine's own stack: install medtune there with ``pip install --no-deps -e .`` (the device has torch,
transformers, accelerate and peft; nothing can be downloaded there), and ship missing wheels with it.

    bash scripts/gpu-wheels.sh gpu-wheels                      # here: the wheels the device lacks (~46 MB)
    python benchmarks/gpu_check.py --wheels gpu-wheels --out gpu-check   # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/dry   # anywhere: builds everything, runs nothing on CUDA

Checks:

``packed-loss``   per-sample loss of a packed batch equals the unpacked one on a tiny composed VLM, for each
                  attention implementation that is installed (sdpa and flex_attention with position ids,
                  flash_attention_2 with flattened varlen rows), in bf16 on the GPU (fp32 in the dry run).
                  Tolerance: 2e-2 absolute in bf16 (bf16 keeps 8 bits of mantissa; the reduction order differs
                  between the two layouts), 1e-4 in fp32.
``mfu``           a ~1.85 B-parameter composed VLM built from configs (random weights; a CLIP-L/14-336-sized
                  tower + mlp2x_gelu + a Qwen2-1.5B-sized LM) trains ``--steps`` steps on a variable-length mix
                  shaped like LLaVA-Med's instruction data (one 576-token image + 32-1,400 text tokens, log-normal),
                  packed (flash-attention varlen when installed, else sdpa with position ids) and padded to the
                  longest in the batch, bf16 with gradient checkpointing. Prints useful tokens/s and model FLOPs
                  utilisation against the machine's bf16 peak, measured here as an 8192^3 matmul.
                  FLOPs per sample of T LM tokens and P image patches (model FLOPs: recomputation by gradient
                  checkpointing not counted): 6 * N_lm * T + 6 * L_lm * d_lm * T^2 (causal attention)
                  + 6 * N_vision * P + 12 * L_vision * d_vision * P^2 (bidirectional) + 6 * N_projector * P,
                  N excluding embeddings.
``fsdp2``,        one short stage through Trainer (``medtune train`` under torchrun, world size 1) with that
``zero2``,        engine, then the saved model must load and give the in-memory model's logits.
``zero3``
``qlora``         a LoRA stage over a 4-bit bitsandbytes base of a few steps, then ``medtune merge``; the merged
                  model must load and give finite logits.
``eval-batching`` ``medtune eval run`` questions/s at batch 1 vs 32 on the bundled VQA-RAD test split, answers
                  identical.
``post-training`` a DPO stage (full fine-tuning: its reference is a frozen copy, which must follow the policy to
                  the GPU), the same with ``precompute_reference``, and a GRPO stage, each a few bf16 steps on the
                  tiny model and bundled pairs / questions; every loss must be finite.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CHECKS = ("packed-loss", "mfu", "fsdp2", "zero2", "zero3", "qlora", "eval-batching", "post-training")
BF16_TOLERANCE, FP32_TOLERANCE = 2e-2, 1e-4


@dataclass
class Row:
    check: str
    setting: str
    status: str          # ok | FAIL | skipped | planned (dry run)
    result: str = ""
    details: dict = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="build everything, run nothing on CUDA")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for runs and gpu_check.json")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of the MFU runs")
    parser.add_argument("--wheels", type=Path, help="install these wheels / sdists first (pip --no-deps, offline): "
                                                     "what scripts/gpu-wheels.sh collected")
    parser.add_argument("--worker", help=argparse.SUPPRESS)   # internal: one Trainer-engine run under torchrun
    args = parser.parse_args(argv)
    if args.worker:
        return engine_worker(args.worker, args.out)
    setup = install_wheels(args.wheels, dry_run=args.dry_run) if args.wheels else []
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run to check the script itself", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(CHECKS))
    if unknown:
        parser.error(f"--only: unknown checks {unknown}")
    rows: list[Row] = list(setup)
    runners = {"packed-loss": check_packed_loss, "mfu": check_mfu, "fsdp2": check_engine, "zero2": check_engine,
               "zero3": check_engine, "qlora": check_qlora, "eval-batching": check_eval_batching,
               "post-training": check_post_training}
    for name in chosen:
        started = time.monotonic()
        try:
            found = runners[name](name, cuda=cuda, out=args.out, steps=args.steps)
        except Exception as error:   # one check's failure must not hide the others
            found = [Row(name, "-", "FAIL", f"{type(error).__name__}: {error}")]
        for row in found:
            row.details.setdefault("seconds", round(time.monotonic() - started, 1))
        rows += found
    print_table(rows, cuda=cuda)
    (args.out / "gpu_check.json").write_text(json.dumps([row.__dict__ for row in rows], indent=2, default=str))
    return 1 if any(row.status == "FAIL" for row in rows) else 0


def print_table(rows: list[Row], *, cuda: bool) -> None:
    import torch

    device = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    print(f"\nmedtune GPU check on {device}, torch {torch.__version__}")
    widths = [max(len(getattr(r, key)) for r in rows + [Row("check", "setting", "status", "result")])
              for key in ("check", "setting", "status")]
    print(f"{'check':<{widths[0]}}  {'setting':<{widths[1]}}  {'status':<{widths[2]}}  result")
    for row in rows:
        print(f"{row.check:<{widths[0]}}  {row.setting:<{widths[1]}}  {row.status:<{widths[2]}}  {row.result}")


def install_wheels(folder: Path, *, dry_run: bool) -> list[Row]:
    """pip-install every wheel and sdist in ``folder`` without dependencies or an index; one row per file (a file
    that does not install leaves its check skipped, with the reason, rather than failing the run)."""
    import os

    files = sorted(p for p in folder.iterdir() if p.name.endswith((".whl", ".tar.gz")))
    if not files:
        return [Row("setup", str(folder), "FAIL", "no wheels or sdists there")]
    rows = []
    for file in files:
        if dry_run:
            rows.append(Row("setup", file.name, "planned", "pip install --no-deps --no-index"))
            continue
        # DeepSpeed's sdist builds no CUDA ops (DS_BUILD_OPS=0): it JIT-compiles what it needs, or runs without
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                   "--no-build-isolation", str(file)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "DS_BUILD_OPS": "0"})
        last = (done.stderr.strip().splitlines() or [""])[-1]
        rows.append(Row("setup", file.name, "ok" if done.returncode == 0 else "skipped",
                        "installed" if done.returncode == 0 else f"did not install: {last[:160]}"))
    import importlib

    importlib.invalidate_caches()   # the checks look the new packages up in this process
    return rows


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---- packed-loss -------------------------------------------------------------------------------------------


def attention_modes(cuda: bool) -> list[tuple[str, str, str]]:
    """(attention implementation, packing mode, why skipped or "") in the order they are checked."""
    modes = [("sdpa", "position_ids", ""), ("flex_attention", "position_ids", "")]
    flash = "" if installed("flash_attn") else "flash-attn is not installed"
    if not cuda:
        flash = "needs CUDA"
        modes[1] = ("flex_attention", "position_ids", "compiled flex attention is checked on the GPU")
    modes.append(("flash_attention_2", "flatten", flash))
    return modes


def per_sample_losses(logits, labels, spans):
    import torch

    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none",
                                               ignore_index=-100)
    return [float(losses[row, start:end].sum() / (targets[row, start:end] != -100).sum().clamp(min=1))
            for row, start, end in spans]


def check_packed_loss(name: str, *, cuda: bool, out: Path, steps: int) -> list[Row]:
    import torch

    from medtune.models.build import build_vlm
    from medtune.models.presets import tiny_spec
    from medtune.models.collate import pad_batch
    from medtune.models.packing import pack_rows, sample_spans

    dtype = torch.bfloat16 if cuda else torch.float32
    tolerance = BF16_TOLERANCE if cuda else FP32_TOLERANCE
    samples = synthetic_samples(6, image_tokens=16, text_range=(8, 60), vocab=2000, image_token_id=None, seed=0)
    rows = []
    for implementation, mode, skip in attention_modes(cuda):
        if skip:
            rows.append(Row(name, f"{implementation} ({mode})", "skipped", skip))
            continue
        vlm = build_vlm(tiny_spec(dtype="bfloat16" if cuda else "float32"))
        vlm.model.set_attn_implementation(implementation)
        model = vlm.model.to("cuda" if cuda else "cpu").eval()
        examples = _with_image_token(samples, vlm)
        device = next(model.parameters()).device
        with torch.no_grad():
            unpacked = []
            for example in examples:
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in pad_batch([example], 0).items()}
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                unpacked += per_sample_losses(logits, batch["labels"], [(0, 0, len(example["input_ids"]))])
            rows_of_samples = [examples[:3], examples[3:]]
            packed_batch = pack_rows(rows_of_samples, vlm.tokenizer.pad_token_id, attention=mode)
            packed_batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in packed_batch.items()}
            packed_batch["pixel_values"] = packed_batch["pixel_values"].to(dtype)
            logits = model(**{k: v for k, v in packed_batch.items() if k != "labels"}).logits
            if mode == "flatten":   # one row holds every sample
                spans = [(0, start, end) for start, end in sample_spans(packed_batch["position_ids"][0])]
            else:                   # each row's samples first, then its padding (a span of its own)
                spans = [(row, start, end) for row, members in enumerate(rows_of_samples)
                         for start, end in sample_spans(packed_batch["position_ids"][row])[:len(members)]]
            spans = spans[:len(examples)]
            packed = per_sample_losses(logits, packed_batch["labels"], spans)
        worst = max(abs(a - b) for a, b in zip(packed, unpacked))
        status = "ok" if worst <= tolerance else "FAIL"
        rows.append(Row(name, f"{implementation} ({mode}, {str(dtype).split('.')[-1]})", status,
                        f"max |packed - unpacked| per-sample loss {worst:.2e} (tolerance {tolerance:g})",
                        {"packed": packed, "unpacked": unpacked}))
    return rows


def synthetic_samples(n: int, *, image_tokens: int, text_range: tuple[int, int], vocab: int, image_token_id,
                      seed: int, log_normal: bool = False) -> list[dict]:
    """Encoded samples: [bos] + image placeholder copies + text, labels on the text's second half."""
    import random

    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        if log_normal:   # LLaVA-Med instruction data: median ~150 text tokens, a long tail
            length = int(min(text_range[1], max(text_range[0], rng.lognormvariate(math.log(150), 0.9))))
        else:
            length = rng.randint(*text_range)
        text = [rng.randrange(10, vocab) for _ in range(length)]
        ids = [1] + [-1] * image_tokens + text   # -1: the image token id, filled in for the model
        labels = [-100] * (len(ids) - length // 2) + ids[len(ids) - length // 2:]
        samples.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return samples


def _with_image_token(samples: list[dict], vlm) -> list[dict]:
    """Samples with the model's image token in the placeholder places and random pixels for their image."""
    import torch

    generator = torch.Generator().manual_seed(1)
    out = []
    for sample in samples:
        ids = [vlm.image_token_id if t == -1 else t for t in sample["input_ids"]]
        out.append({**sample, "input_ids": ids,
                    "pixel_values": torch.rand(1, 3, vlm.image_size, vlm.image_size, generator=generator)})
    return out


# ---- mfu -------------------------------------------------------------------------------------------------


def big_spec():
    """A CLIP ViT-L/14-336-sized tower + mlp2x_gelu + a Qwen2-1.5B-sized LM, random weights (1.85 B parameters)."""
    from medtune.models.build import ModelSpec

    vision = {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14, "hidden_size": 1024,
              "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
    llm = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
           "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151_936,
           "max_position_embeddings": 4096, "tie_word_embeddings": True}
    return ModelSpec(vision=vision, llm=llm, tokenizer="offline", template="qwen", dtype="bfloat16")


def model_flops(vlm, lm_lengths: list[int], patches_per_image: int, images: int) -> float:
    """Model FLOPs of one forward + backward over samples of ``lm_lengths`` tokens (module docstring)."""
    config = vlm.model.config
    text, vision = config.text_config, config.vision_config
    named = dict(vlm.model.named_parameters())
    n_lm = sum(p.numel() for n, p in named.items() if vlm.part_of(n) == "llm" and "embed_tokens" not in n)
    n_vision = sum(p.numel() for n, p in named.items() if vlm.part_of(n) == "vision" and "embeddings" not in n)
    n_projector = sum(p.numel() for n, p in named.items() if vlm.part_of(n) == "projector")
    lm = sum(6 * n_lm * t + 6 * text.num_hidden_layers * text.hidden_size * t * t for t in lm_lengths)
    per_image = (6 * n_vision * patches_per_image
                 + 12 * vision.num_hidden_layers * vision.hidden_size * patches_per_image ** 2
                 + 6 * n_projector * patches_per_image)
    return lm + images * per_image


def measured_peak_tflops(cuda: bool) -> float | None:
    """bf16 TFLOP/s of an 8192^3 matmul on this machine (None in the dry run)."""
    if not cuda:
        return None
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * repeats / (time.perf_counter() - started) / 1e12


def check_mfu(name: str, *, cuda: bool, out: Path, steps: int) -> list[Row]:
    import torch

    from medtune.models.build import build_vlm
    from medtune.models.collate import pad_batch
    from medtune.models.packing import pack_rows, plan_rows

    spec = big_spec()
    parameters = full_size_parameters(spec)
    if not cuda:   # the dry run: the same code on a 2-layer copy, one step of each layout on the CPU
        spec = dataclasses.replace(spec, dtype="float32",
                                   vision={**spec.vision, "num_hidden_layers": 2, "hidden_size": 64,
                                           "intermediate_size": 128, "num_attention_heads": 4},
                                   llm={**spec.llm, "num_hidden_layers": 2, "hidden_size": 64,
                                        "intermediate_size": 128, "num_attention_heads": 4,
                                        "num_key_value_heads": 2, "vocab_size": 4096})
    vlm = build_vlm(spec)
    patches = vlm.image_tokens_per_image
    samples = _with_image_token(synthetic_samples(256, image_tokens=patches, text_range=(32, 1400), vocab=2000,
                                                  image_token_id=None, seed=0, log_normal=True), vlm)
    budget = 16_384 if cuda else 2_048   # LM tokens per optimizer step, both layouts
    steps = steps if cuda else 1
    device = "cuda" if cuda else "cpu"
    peak = measured_peak_tflops(cuda)
    flash = cuda and installed("flash_attn")
    implementation, mode = ("flash_attention_2", "flatten") if flash else ("sdpa", "position_ids")
    vlm.model.set_attn_implementation(implementation)
    model = vlm.model.to(device).train()
    # the new name where transformers has it (the old one warns); older versions have only the old one
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    dtype = torch.bfloat16 if cuda else torch.float32

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    def batches(packed: bool):
        order, i = list(range(len(samples))), 0
        while True:
            chosen, tokens = [], 0
            while tokens < budget:
                chosen.append(samples[order[i % len(order)]])
                tokens += len(chosen[-1]["input_ids"])
                i += 1
            if packed:
                rows = plan_rows([len(s["input_ids"]) for s in chosen], 4096)
                yield pack_rows([[chosen[j] for j in row] for row in rows], vlm.tokenizer.pad_token_id,
                                attention=mode), chosen
            else:
                yield pad_batch(chosen, vlm.tokenizer.pad_token_id), chosen

    rows = []
    for packed in (True, False):
        stream = batches(packed)
        useful = flops = 0
        for step in range(steps + 2):   # two warm-up steps are not timed
            batch, chosen = next(stream)
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            if step == 2:
                synchronize()
                started = time.perf_counter()
            with torch.autocast(device, dtype=dtype, enabled=cuda):
                loss, _ = vlm.training_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= 2:
                useful += sum(len(s["input_ids"]) for s in chosen)
                flops += model_flops(vlm, [len(s["input_ids"]) for s in chosen], patches, len(chosen))
        synchronize()
        seconds = time.perf_counter() - started
        layout = f"{'packed' if packed else 'padded'} ({implementation}, {'bf16' if cuda else 'fp32'}, grad ckpt)"
        if not cuda:   # the dry run proves the loop and the formula, not a speed
            rows.append(Row(name, layout, "planned", f"1 step of a 2-layer copy ran; full model "
                            f"{parameters / 1e9:.2f} B parameters, {patches} image tokens per image",
                            {"parameters": parameters, "flops_per_step": flops}))
            continue
        mfu = flops / seconds / 1e12 / peak
        rows.append(Row(name, layout, "ok", f"{useful / seconds:,.0f} useful tok/s, MFU {mfu:.1%} of {peak:.0f} TFLOP/s",
                        {"tokens_per_second": useful / seconds, "mfu": mfu, "peak_tflops": peak,
                         "parameters": parameters, "peak_memory_gb": torch.cuda.max_memory_allocated() / 2 ** 30}))
    if cuda:
        ratio = rows[0].details["tokens_per_second"] / rows[1].details["tokens_per_second"]
        rows.append(Row(name, "packed / padded", "ok", f"{ratio:.2f}x useful tokens/s (goal >= 2x; MFU goal >= 45%)",
                        {"ratio": ratio}))
    return rows


def full_size_parameters(spec) -> int:
    """Parameters of the full-size model, counted on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = AutoConfig.for_model(**spec.vision)
    text = AutoConfig.for_model(**spec.llm)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text))
    return sum(p.numel() for p in model.parameters())


# ---- Trainer engines --------------------------------------------------------------------------------------


def engine_recipe(strategy: str, out: Path) -> dict:
    return {"model": {"preset": "tiny"}, "output_dir": str(out / f"engine-{strategy}"),
            "cache_dir": str(out / "cache"), "report_to": ["none"],
            "distributed": {"strategy": strategy},
            "stages": [{"name": "sft", "lr": {"projector": 1e-3, "llm": 1e-3}, "max_steps": 3, "batch_size": 4,
                        "max_length": 256, "precision": "bf16", "save_steps": 3,
                        "data": {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad", "limit": 32}}]}


def check_engine(name: str, *, cuda: bool, out: Path, steps: int) -> list[Row]:
    if name.startswith("zero") and not installed("deepspeed"):
        return [Row(name, "Trainer, world size 1", "skipped", "DeepSpeed is not installed")]
    recipe = engine_recipe(name, out)
    command = ["torchrun", "--standalone", "--nproc_per_node", "1", str(Path(__file__).resolve()), "--worker", name,
               "--out", str(out)]
    if not cuda:
        from medtune.train.recipe import parse_recipe

        parse_recipe(recipe)   # the recipe the run will train is valid
        return [Row(name, "Trainer, world size 1", "planned", " ".join(command[:5]) + " ...")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    report = out / f"engine-{name}.json"
    if done.returncode != 0 or not report.is_file():
        return [Row(name, "Trainer, world size 1", "FAIL", (done.stderr or done.stdout)[-400:].replace("\n", " "))]
    result = json.loads(report.read_text())
    status = "ok" if result["max_abs_logit_diff"] <= 1e-2 else "FAIL"
    return [Row(name, "Trainer, world size 1", status,
                f"{result['steps']} steps; saved model vs in-memory logits max |diff| {result['max_abs_logit_diff']:.2e}",
                result)]


def engine_worker(strategy: str, out: Path) -> int:
    """Under torchrun: train the engine recipe's stage, keep the in-memory model's logits on a fixed batch just
    before the stage saves, then compare them with the saved model's."""
    import torch

    import medtune.train.run as run
    from medtune.models.build import load_vlm
    from medtune.train.recipe import parse_recipe

    recipe = parse_recipe(engine_recipe(strategy, out))
    probe = torch.randint(5, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    captured = {}
    original = run.save_stage_model

    def capture_then_save(trainer, vlm, stage, directory):
        model = trainer.accelerator.unwrap_model(trainer.model)
        with torch.no_grad():
            captured["logits"] = model(input_ids=probe.to(model.device)).logits.float().cpu()
        captured["steps"] = trainer.state.global_step
        return original(trainer, vlm, stage, directory)

    run.save_stage_model = capture_then_save
    results = run.run_recipe(recipe)
    if run.is_main_process():
        saved = load_vlm(results[0].model_dir, device="cuda").model.eval()
        with torch.no_grad():
            logits = saved(input_ids=probe.cuda()).logits.float().cpu()
        diff = float((logits - captured["logits"]).abs().max())
        (out / f"engine-{strategy}.json").write_text(json.dumps({"steps": captured["steps"],
                                                                  "max_abs_logit_diff": diff}))
    return 0


# ---- QLoRA -------------------------------------------------------------------------------------------------


def check_qlora(name: str, *, cuda: bool, out: Path, steps: int) -> list[Row]:
    recipe = {"model": {"preset": "tiny"}, "output_dir": str(out / "qlora"), "cache_dir": str(out / "cache"),
              "report_to": ["none"],
              "stages": [{"name": "qlora", "lr": {"lora": 1e-3, "projector": 1e-3}, "max_steps": 3, "batch_size": 4,
                          "max_length": 256, "precision": "bf16",
                          "lora": {"r": 4, "alpha": 8, "quantize": "4bit", "target_modules": ["q_proj", "v_proj"]},
                          "data": {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad", "limit": 32}}]}
    if not installed("bitsandbytes"):
        return [Row(name, "4-bit base + LoRA, then merge", "skipped", "bitsandbytes is not installed")]
    from medtune.train.recipe import parse_recipe

    parsed = parse_recipe(recipe)
    if not cuda:
        return [Row(name, "4-bit base + LoRA, then merge", "planned", "recipe checked")]
    import torch

    from medtune.models.build import load_vlm
    from medtune.train.run import run_recipe

    result = run_recipe(parsed)[0]
    merged = load_vlm(result.model_dir, device="cuda").model.eval()
    with torch.no_grad():
        logits = merged(input_ids=torch.randint(5, 1000, (1, 24), device="cuda")).logits
    finite = bool(torch.isfinite(logits).all())
    return [Row(name, "4-bit base + LoRA, then merge", "ok" if finite else "FAIL",
                f"{result.steps} steps, loss {result.train_loss:.3f}; merged model logits finite: {finite}")]


# ---- eval batching -----------------------------------------------------------------------------------------


def check_eval_batching(name: str, *, cuda: bool, out: Path, steps: int) -> list[Row]:
    from medtune.eval.backends import LocalBackend
    from medtune.eval.run import run_task
    from medtune.eval.tasks import get_task
    from medtune.models.build import build_vlm
    from medtune.models.presets import small_spec, tiny_spec

    vlm = build_vlm(small_spec() if cuda else tiny_spec())
    if cuda:
        vlm.model.cuda()
    limit = None if cuda else 8
    task = get_task("vqa-rad")
    rows, answers = [], {}
    for batch_size in ((1, 32) if cuda else (1, 4)):
        folder = out / f"eval-batch-{batch_size}"
        started = time.perf_counter()
        result = run_task(task, LocalBackend(vlm, batch_size=batch_size), folder, batch_size=batch_size, limit=limit,
                          progress=False, score=False, resume=False)
        seconds = time.perf_counter() - started
        from medtune.eval.predictions import parse_record

        records = [json.loads(line) for line in result.shard_path.read_text().splitlines() if line.strip()]
        answers[batch_size] = dict(parse_record(record) for record in records)
        rows.append(Row(name, f"batch {batch_size}", "ok", f"{result.answered / seconds:.1f} questions/s "
                        f"({result.answered} questions, {seconds:.1f} s)", {"questions_per_second":
                                                                           result.answered / seconds}))
    sizes = sorted(answers)
    same = answers[sizes[0]] == answers[sizes[1]]
    ratio = rows[1].details["questions_per_second"] / rows[0].details["questions_per_second"]
    rows.append(Row(name, f"batch {sizes[1]} / batch 1", "ok" if same else "FAIL",
                    f"{ratio:.2f}x; answers identical: {same}"))
    return rows


# ---- post-training -----------------------------------------------------------------------------------------


def check_post_training(name: str, *, cuda: bool, out: Path, steps: int) -> list[Row]:
    from medtune.train.recipe import parse_recipe, tiny_preferences

    questions = {"path": "bundled:vqa_rad/trainset.json", "format": "vqa-rad", "limit": 16}
    stages = {"dpo": {"method": "dpo", "data": tiny_preferences()},
              "dpo, precomputed reference": {"method": "dpo", "dpo": {"precompute_reference": True},
                                             "data": tiny_preferences()},
              "grpo": {"method": "grpo", "grpo": {"group_size": 2, "max_new_tokens": 4}, "data": questions}}
    rows = []
    for setting, stage in stages.items():
        folder = out / "post-training" / setting.replace(", ", "-").replace(" ", "-")
        recipe = parse_recipe({"model": {"preset": "tiny"}, "output_dir": str(folder), "report_to": ["none"],
                               "cache_dir": str(out / "cache"),
                               "stages": [{"name": "post", "lr": {"llm": 1e-4}, "max_steps": 3, "batch_size": 4,
                                           "max_length": 256, "precision": "bf16" if cuda else "fp32",
                                           "save_steps": 3, **stage}]})
        if not cuda:
            rows.append(Row(name, setting, "planned", "recipe checked"))
            continue
        from medtune.train.run import run_recipe

        result = run_recipe(recipe)[0]
        finite = result.train_loss is not None and math.isfinite(result.train_loss)
        rows.append(Row(name, setting, "ok" if finite else "FAIL", f"{result.steps} steps, loss {result.train_loss}"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
