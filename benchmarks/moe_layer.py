"""Benchmark: one MoE layer's forward + backward against the dense FFN it was upcycled from, in one run.

Four layers on the same tokens, each timed over ``--steps`` forward+backward passes after ``--warmup`` passes
(the layers take turns, one pass each per round; the table shows the median pass):

* dense: the FFN alone (transformers' LlamaMLP, SwiGLU): the baseline of every ratio;
* moe grouped_mm: ``medtune.models.moe.layers.MoEBlock`` (Med-MoE settings: shared expert + routed experts, top-k,
  dropless) dispatched by transformers' ``grouped_mm`` experts kernel;
* moe eager: the same block with medtune's eager experts loop (``index_add_`` per expert);
* naive loop: a reference written here the way MoE layers are often first written: an ``nn.ModuleList`` of
  FFN copies, a Python loop over experts, boolean-mask gather and scatter.

All MoE variants hold the same weights and give the same output (checked before timing). Experts start as
noisy copies of the FFN and the router is random, so the routing is roughly balanced.

Peak memory is the most memory the pass allocates above what was live before it (weights and inputs are
excluded, gradients and activations included). On a GPU: the CUDA allocator's peak. On a CPU: torch's CPU
memory profiler (``torch.profiler`` with ``profile_memory=True``): the running sum of every operator's own
allocations minus frees, in time order, so a temporary allocated and freed inside one operator is not seen.

    python benchmarks/moe_layer.py
    python benchmarks/moe_layer.py --hidden 2048 --intermediate 5632 --tokens 4096 --dtypes bfloat16 --device cuda
"""
from __future__ import annotations

import argparse
import copy
import time


def naive_loop_moe(block):
    """The reference layer: per-expert FFN modules and a Python loop, with ``block``'s weights."""
    import torch
    from torch import nn

    class NaiveLoopMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = copy.deepcopy(block.gate)
            self.shared_expert = copy.deepcopy(block.shared_expert)
            self.experts = nn.ModuleList(copy.deepcopy(block.shared_expert) for _ in range(block.gate.num_experts))
            fused = block.experts
            intermediate = fused.down_proj.shape[-1]
            with torch.no_grad():
                for e, expert in enumerate(self.experts):
                    expert.gate_proj.weight.copy_(fused.gate_up_proj[e, :intermediate])
                    expert.up_proj.weight.copy_(fused.gate_up_proj[e, intermediate:])
                    expert.down_proj.weight.copy_(fused.down_proj[e])

        def forward(self, hidden):
            flat = hidden.reshape(-1, hidden.shape[-1])
            _, weights, index = self.gate(flat)
            routed = torch.zeros_like(flat)
            for e, expert in enumerate(self.experts):
                chosen = index == e                     # [T, k]
                tokens = chosen.any(dim=-1)
                if tokens.any():
                    weight = (weights * chosen).sum(dim=-1, keepdim=True)[tokens].to(flat.dtype)
                    routed[tokens] += weight * expert(flat[tokens])
            return self.shared_expert(hidden) + routed.view(hidden.shape)

    return NaiveLoopMoE()


def layers(args, dtype, device):
    """name -> module, all built from one dense FFN."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from medtune.models.moe.layers import MoEBlock, MoESettings

    torch.manual_seed(0)
    dense = LlamaMLP(LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, hidden_act="silu"))
    settings = MoESettings.preset("med-moe", num_experts=args.experts, top_k=args.top_k, expert_noise=0.1)
    grouped = MoEBlock.from_dense(copy.deepcopy(dense), settings, args.hidden)
    eager = copy.deepcopy(grouped)
    eager.experts.experts_implementation = "eager"
    built = {"dense": dense, "moe grouped_mm": grouped, "moe eager": eager, "naive loop": naive_loop_moe(grouped)}
    return {name: module.to(device=device, dtype=dtype) for name, module in built.items()}


def step(module, hidden):
    for parameter in module.parameters():
        parameter.grad = None
    inputs = hidden.detach().requires_grad_(True)
    output = module(inputs)
    output.float().square().mean().backward()
    return output


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(module, hidden, device) -> int:
    """Most memory one forward + backward allocates above what was live before it."""
    import torch

    for parameter in module.parameters():
        parameter.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(module, hidden)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step(module, hidden)
    live = peak = 0
    for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure(built: dict, hidden, args, device) -> dict:
    """name -> seconds per step (median), tokens/s and peak bytes. The layers take turns, one step each per
    round, so a change in machine load during the run hits all of them alike."""
    import statistics

    for module in built.values():
        for _ in range(args.warmup):
            step(module, hidden)
    times = {name: [] for name in built}
    for _ in range(args.steps):
        for name, module in built.items():
            synchronize(device)
            started = time.perf_counter()
            step(module, hidden)
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    tokens = hidden.numel() // hidden.shape[-1]
    results = {}
    for name, module in built.items():
        seconds = statistics.median(times[name])
        results[name] = {"seconds": seconds, "tokens_per_s": tokens / seconds,
                         "peak": peak_bytes(module, hidden, device)}
    return results


def check_same_output(built, hidden, dtype) -> float:
    """Largest difference of the MoE variants from the grouped_mm block (they hold the same weights)."""
    import torch

    with torch.no_grad():
        reference = built["moe grouped_mm"](hidden).float()
        worst = max((built[name](hidden).float() - reference).abs().max().item()
                    for name in ("moe eager", "naive loop"))
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if worst > tolerance * max(1.0, reference.abs().max().item()):
        raise SystemExit(f"the MoE variants disagree by {worst:.3g}: the benchmark would compare different layers")
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--steps", type=int, default=7, help="timed forward+backward passes per layer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory_source = "CUDA allocator peak" if device.type == "cuda" else "torch CPU memory profiler"
    print(f"MoE layer forward+backward: H={args.hidden}, I={args.intermediate}, {args.experts} experts, "
          f"top-{args.top_k}, shared expert, {args.tokens} tokens, median of {args.steps} steps, device {device}"
          + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
          + f"; peak memory: {memory_source}\n")
    print("| dtype | layer | ms / step | tokens/s | vs dense | peak MiB | vs dense |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name.strip())
        built = layers(args, dtype, device)
        hidden = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        difference = check_same_output(built, hidden, dtype)
        results = measure(built, hidden, args, device)
        with torch.no_grad():
            _, _, index = built["moe grouped_mm"].gate(hidden.reshape(-1, args.hidden))
        loads = torch.bincount(index.reshape(-1).cpu(), minlength=args.experts).tolist()
        dense = results["dense"]
        for name, result in results.items():
            print(f"| {dtype_name} | {name} | {result['seconds'] * 1e3:.1f} | {result['tokens_per_s']:,.0f} | "
                  f"{result['tokens_per_s'] / dense['tokens_per_s']:.2f} | {result['peak'] / 2**20:.1f} | "
                  f"{result['peak'] / dense['peak']:.2f} |")
        print(f"|  | MoE variants agree within {difference:.1e}; tokens per expert {loads} | | | | | |")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
