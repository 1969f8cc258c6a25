"""The experts component: mixture-of-experts layers in a model's language model, whichever kind holds them.

A model kind (:mod:`medtune.models.kinds`) holds an :class:`Experts` in ``vlm.experts`` once some of its LLM's
FFNs are experts; the kind object asks it what depends on the experts alone, never on how the kind makes its
inputs:

* **parts**: a parameter of the LLM under an ``mlp`` module is ``router`` (the gate), ``experts`` (routed
  experts, shared expert and its gate) or ``ffn`` (the FFN of a layer without experts) (:meth:`part_within_llm`);
* **LoRA on fused expert weights** (:meth:`lora_parameter_targets`);
* **the router losses** every training objective adds (:meth:`auxiliary_loss`: load balancing and z-loss, when
  their weights are not 0);
* **routing statistics**: per MoE layer, how many tokens of each domain (the sample metadata field
  :attr:`Experts.domain_field`, e.g. the image's modality) went to each expert, while training and over the
  prompts of an evaluation run, written as ``routing.json``, ``routing.md`` and ``routing.png``;
* **what medtune.json records** to rebuild the layers when the model class itself cannot (:meth:`record`,
  :func:`with_expert_layers`).

The layers themselves are :mod:`medtune.models.moe.layers`'; the settings :mod:`medtune.models.moe.settings`'.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medtune.models.batch import IGNORE_INDEX, SAMPLE_INDEX, SAMPLE_METADATA
from medtune.models.moe.settings import MoESettings

EXPERT_COMPONENTS = ("experts", "shared_expert", "shared_expert_gate")


@dataclass(kw_only=True)
class Experts:
    """The MoE layers of one model: their settings, where they are, and the routing counted so far."""

    parts: ClassVar[tuple[str, ...]] = ("ffn", "experts", "router")
    """The parts experts add to a kind's (each with a learning rate in a recipe)."""

    settings: MoESettings
    layers: list[int]
    """The decoder layers whose FFN became experts."""
    domain_field: str = "modality"
    """The sample metadata field routing statistics group tokens by (the router's label)."""
    routing: RoutingCounts | None = field(default=None, repr=False)
    """Per-domain expert counts gathered while training, when samples carry their domain."""
    eval_routing: RoutingCounts | None = field(default=None, repr=False)
    """The same, gathered over the prompts an evaluation run asked."""

    @classmethod
    def upcycle(cls, decoder_layers, settings: MoESettings, hidden_size: int, *, router_state: dict | None = None,
                domain_field: str = "modality") -> Experts:
        """In place: the FFNs of ``settings``' layers become experts (:func:`~medtune.models.moe.layers.upcycle_layers`)."""
        from medtune.models.moe.layers import upcycle_layers

        layers = upcycle_layers(decoder_layers, settings, hidden_size, router_state=router_state)
        return cls(settings=settings, layers=layers, domain_field=domain_field)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Experts:
        """The component as :meth:`record` wrote it into medtune.json."""
        return cls(settings=MoESettings.from_dict(record["moe"]), layers=list(record["layers"]),
                   domain_field=record.get("domain_field", "modality"))

    def record(self) -> dict[str, Any]:
        """What medtune.json keeps of the experts (``experts``): enough to rebuild the layers before loading."""
        return {"moe": self.settings.to_dict(), "layers": list(self.layers), "domain_field": self.domain_field}

    def check_settings(self, settings: MoESettings) -> None:
        """The same settings again are fine (a resumed stage); others are an error."""
        if settings.to_dict() != self.settings.to_dict():
            raise ValueError("the model already has experts, made with other moe settings; a moe section converts "
                             "a dense model, so remove it from this stage")

    # ---- parts ------------------------------------------------------------------------------------------

    @staticmethod
    def part_within_llm(components: list[str]) -> str | None:
        """The part of an LLM parameter (dotted name split into components) under an ``mlp`` module; None for
        the rest of the LLM (attention, norms, embeddings)."""
        if "mlp" not in components:
            return None
        after_mlp = components[len(components) - components[::-1].index("mlp"):]
        inside = after_mlp[0] if after_mlp else ""
        if inside == "gate":
            return "router"
        if inside in EXPERT_COMPONENTS:
            return "experts"
        return "ffn"   # the FFN of a layer without experts

    @staticmethod
    def lora_parameter_targets(model) -> list[str]:
        """Fused expert weights PEFT's LoRA can adapt (``target_parameters``): rank r per expert."""
        from medtune.models.moe.layers import moe_blocks

        names = set()
        for _, block in moe_blocks(model):
            names.update(f"mlp.experts.{name}" for name, _ in block.experts.named_parameters(recurse=False)
                         if not name.endswith("_bias"))
        return sorted(names)

    # ---- training -----------------------------------------------------------------------------------------

    def auxiliary_loss(self, model, inputs: dict[str, Any], num_items_in_batch=None):
        """The weighted router losses of the forward pass ``model`` just ran on ``inputs``; None when both weights
        are 0. With ``num_items_in_batch`` (an accumulated batch, whose LM loss is a sum divided by its labelled
        tokens) each micro-batch's mean router loss gets its share of the labelled tokens."""
        from medtune.models.moe.layers import auxiliary_losses

        settings = self.settings
        if not (settings.aux_loss_coef or settings.z_loss_coef):
            return None
        mask = inputs.get("attention_mask")
        losses = auxiliary_losses(model, settings, attention_mask=mask if mask is not None and mask.dim() == 2
                                  else None)
        extra = settings.aux_loss_coef * losses["balance"] + settings.z_loss_coef * losses["z"]
        if num_items_in_batch is not None:
            labelled = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
            extra = extra * labelled / num_items_in_batch
        return extra

    def count_training_tokens(self, model, inputs: dict[str, Any]) -> None:
        """Add a training batch's tokens to the per-domain expert counts (needs the carried domain: the batch's
        ``sample_metadata`` and ``sample_index``)."""
        metadata, index = inputs.get(SAMPLE_METADATA), inputs.get(SAMPLE_INDEX)
        if metadata is None or index is None:
            return
        import torch

        from medtune.models.moe.layers import routing_counts

        if self.routing is None:
            self.routing = RoutingCounts()
        groups = torch.tensor([self.routing.group(m.get(self.domain_field) if m else None) for m in metadata] + [-1])
        token_groups = groups[index.clamp(min=-1)].reshape(-1)   # index -1 (padding) reads the trailing -1
        self.routing.add(routing_counts(model, token_groups, num_groups=len(self.routing.names)))

    def count_prompt_tokens(self, model, attention_mask, metadata: list[dict]) -> None:
        """Add the tokens of a batch of prompts (the forward pass ``model`` just ran) to the evaluation counts."""
        import torch

        from medtune.models.moe.layers import routing_counts

        if self.eval_routing is None:
            self.eval_routing = RoutingCounts()
        groups = torch.tensor([self.eval_routing.group(m.get(self.domain_field)) for m in metadata])
        token_groups = torch.where(attention_mask.bool().cpu(), groups[:, None], -1).reshape(-1)
        self.eval_routing.add(routing_counts(model, token_groups, num_groups=len(self.eval_routing.names)))

    # ---- reports ------------------------------------------------------------------------------------------

    def write_stage_report(self, model, directory: str | Path) -> None:
        """routing.* in a training stage's folder, when its samples carried their domain."""
        if self.routing is not None and self.routing.names:
            self.routing.write(Path(directory), _block_names(model), self.domain_field)

    def write_eval_report(self, model, out_dir: str | Path, *, suffix: str = "") -> list[Path]:
        if self.eval_routing is None or not self.eval_routing.names:
            return []
        return self.eval_routing.write(Path(out_dir), _block_names(model), self.domain_field, suffix=suffix)

    def describe(self) -> str:
        """One line for ``medtune model info``."""
        settings = self.settings
        capacity = "dropless" if settings.capacity_factor is None else f"capacity {settings.capacity_factor}"
        return (f"experts: {settings.num_experts} per MoE layer in layers {self.layers}, top-{settings.top_k}, "
                f"shared expert {'on' if settings.shared_expert else 'off'}, "
                f"{'renormalised' if settings.renormalize else 'raw'} routing weights, {capacity}")


def _block_names(model) -> list[str]:
    from medtune.models.moe.layers import moe_blocks

    return [name for name, _ in moe_blocks(model)]


def with_expert_layers(model_class: type, experts: Experts) -> type:
    """``model_class`` whose instances get ``experts``' MoE blocks (default-initialised) in their LLM when made,
    so that ``from_pretrained`` loads a checkpoint saved with them. The class keeps its name: what it saves is
    recorded as the family's own class (``architectures``), with the experts described in medtune.json."""
    from medtune.models.moe.layers import build_layers, register_expert_layout

    if getattr(model_class, "medtune_expert_layers", None) is not None:   # already such a class: its family's
        model_class = model_class.__mro__[1]
    settings = MoESettings.from_dict({**experts.settings.to_dict(), "layers": list(experts.layers)})

    def __init__(self, config, *args, **kwargs):
        model_class.__init__(self, config, *args, **kwargs)
        decoder = self.get_decoder()
        build_layers(decoder.layers, settings, config.get_text_config().hidden_size)
        register_expert_layout(decoder)

    return type(model_class.__name__, (model_class,), {"__init__": __init__, "__module__": model_class.__module__,
                                                       "__qualname__": model_class.__qualname__,
                                                       "medtune_expert_layers": experts.record()})


@dataclass
class RoutingCounts:
    """Tokens per (MoE layer, domain, expert), accumulated over batches; domains named as they appear."""

    names: list[str] = field(default_factory=list)
    total: Any = None   # LongTensor [layers, domains, experts]

    def group(self, value) -> int:
        if value is None or value == "":
            return -1
        name = str(value)
        if name not in self.names:
            self.names.append(name)
        return self.names.index(name)

    def add(self, counts) -> None:
        import torch

        if self.total is None:
            self.total = counts.clone()
            return
        if counts.shape[1] > self.total.shape[1]:   # a new domain appeared in this batch
            grown = torch.zeros(counts.shape[0], counts.shape[1], counts.shape[2], dtype=self.total.dtype)
            grown[:, : self.total.shape[1]] = self.total
            self.total = grown
        self.total[:, : counts.shape[1]] += counts

    def shares(self) -> list[list[list[float]]]:
        """Per layer, per domain: the share of its tokens each expert got."""
        totals = self.total.sum(-1, keepdim=True).clamp(min=1)
        return (self.total / totals).tolist()

    def write(self, directory: Path, layers: list[str], domain_field: str, *, suffix: str = "") -> list[Path]:
        """routing.json (counts), routing.md (a table per layer) and routing.png (a heat map per layer)."""
        from medtune.data.jsonl import write_json

        paths = [directory / f"routing{suffix}.{ext}" for ext in ("json", "md", "png")]
        write_json(paths[0], {"domain_field": domain_field, "domains": self.names, "layers": layers,
                              "counts": self.total.tolist()})
        paths[1].write_text(routing_markdown(self, layers, domain_field), encoding="utf-8")
        routing_plot(self, layers, domain_field, paths[2])
        return paths


def routing_markdown(routing: RoutingCounts, layers: list[str], domain_field: str) -> str:
    experts = routing.total.shape[-1]
    lines = [f"# Expert usage by {domain_field}", "",
             "Share of each domain's tokens routed to each expert (top-1 choice), per MoE layer; n = tokens.", ""]
    for layer, (name, shares) in enumerate(zip(layers, routing.shares())):
        lines += [f"## {name}", "", "| " + domain_field + " | n | " + " | ".join(f"expert {e}" for e in range(experts))
                  + " |", "| --- | ---: |" + " ---: |" * experts]
        for domain, row in enumerate(shares):
            n = int(routing.total[layer, domain].sum())
            lines.append(f"| {routing.names[domain]} | {n:,} | " + " | ".join(f"{share:.1%}" for share in row) + " |")
        lines.append("")
    return "\n".join(lines)


def routing_plot(routing: RoutingCounts, layers: list[str], domain_field: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = routing.shares()
    figure, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers) + 1, 0.5 * len(routing.names) + 1.8),
                                squeeze=False)
    for axis, name, grid in zip(axes[0], layers, shares):
        axis.imshow(grid, vmin=0, vmax=1, cmap="Blues", aspect="auto")
        axis.set_title(name.split("layers.")[-1].replace(".mlp", "").join(["layer ", ""]), fontsize=9)
        axis.set_xticks(range(len(grid[0])), [str(e) for e in range(len(grid[0]))])
        axis.set_yticks(range(len(routing.names)), routing.names if axis is axes[0][0] else [])
        for domain, row in enumerate(grid):
            for expert, share in enumerate(row):
                axis.text(expert, domain, f"{share:.0%}", ha="center", va="center", fontsize=7,
                          color="white" if share > 0.6 else "black")
        axis.set_xlabel("expert")
    figure.suptitle(f"expert usage by {domain_field} (share of tokens)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
