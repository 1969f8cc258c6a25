"""The MoE kind: a composed model whose LLM has mixture-of-experts layers (``medtune_moe_vlm``).

Inputs, prompts, the token cache and collation are the composed kind's. What differs:

* Parts: beside vision, projector and llm, ``experts`` (every MoE layer's routed experts and shared expert),
  ``router`` (every MoE layer's gate) and ``ffn`` (the FFNs of the layers without experts, which Med-MoE trains
  in its stage 3). Each has its own learning rate in a recipe; 0 freezes it.
* The training loss adds the load-balancing and router z-losses when their weights are not 0, computed from the
  router logits the MoE layers record in their forward pass.
* Routing statistics: the sample metadata field :attr:`MoEVLM.domain_field` (the router's label, e.g. the
  image's modality) travels with every sample, and each training batch adds, per MoE layer, how many tokens of
  each domain went to each expert; :meth:`MoEVLM.write_stage_report` writes the table and a plot.
* A dense composed model becomes this kind through :meth:`ComposedVLM.with_experts
  <medtune.models.kinds.composed.ComposedVLM.with_experts>` (upcycling: experts copied from the trained FFNs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medtune.models.batch import IGNORE_INDEX, SAMPLE_INDEX, SAMPLE_METADATA
from medtune.models.kinds.base import LORA_COMPONENTS, Speedups
from medtune.models.kinds.composed import ComposedVLM



@dataclass(kw_only=True)
class MoEVLM(ComposedVLM):
    kind: ClassVar[str] = "moe"
    parts: ClassVar[tuple[str, ...]] = ("vision", "projector", "llm", "ffn", "experts", "router")

    domain_field: str = "modality"
    """The sample metadata field routing statistics group tokens by (the router's label)."""
    routing: Any = field(default=None, repr=False)
    """Per-domain expert counts gathered while training (:class:`RoutingCounts`), when samples carry domains."""
    eval_routing: Any = field(default=None, repr=False)
    """The same, gathered over the prompts an evaluation run asked."""

    @classmethod
    def load(cls, source: str, metadata: dict[str, Any] | None, *, model_kwargs: dict, device: str) -> MoEVLM:
        composed = ComposedVLM.load(source, metadata, model_kwargs=model_kwargs, device=device)
        return cls(**_fields_of(composed), domain_field=(metadata or {}).get("domain_field", "modality"))

    @classmethod
    def from_dense(cls, vlm: ComposedVLM, settings, *, router_state: dict | None = None,
                   domain_field: str = "modality") -> MoEVLM:
        """Upcycle a dense composed model: the FFNs of ``settings``' layers become experts (in place, the weights
        are moved, not copied, into the new model)."""
        import torch

        from medtune.models.moe import layers as moe
        from medtune.models.moe.model import (MedtuneMoEVLMConfig, MedtuneMoEVLMForConditionalGeneration,
                                              register_expert_layout)

        dense = vlm.model
        language_model = dense.model.language_model
        layers = settings.layer_indices(len(language_model.layers))
        settings_dict = {**dense.config.to_dict(), "moe": settings.to_dict(), "moe_layers": layers,
                         "projector_type": getattr(dense.config, "projector_type", "mlp2x_gelu"),
                         "lm_head_bias": dense.lm_head.bias is not None}
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            settings_dict.pop(key, None)
        config = MedtuneMoEVLMConfig(**settings_dict)
        with torch.device("meta"):
            model = MedtuneMoEVLMForConditionalGeneration(config)
        model.model.vision_tower = dense.model.vision_tower
        model.model.multi_modal_projector = dense.model.multi_modal_projector
        model.model.language_model = language_model
        model.lm_head = dense.lm_head
        model.generation_config = dense.generation_config
        moe.upcycle_layers(language_model.layers, settings, config.text_config.hidden_size,
                           router_state=router_state)
        register_expert_layout(language_model)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_meta:
                raise RuntimeError(f"upcycling left {name} uninitialised (meta tensor)")
        model.train(dense.training)
        fields = _fields_of(vlm)
        fields.update(model=model, sample_metadata=tuple(dict.fromkeys((*vlm.sample_metadata, domain_field))))
        return cls(**fields, domain_field=domain_field)

    @property
    def settings(self):
        from medtune.models.moe.settings import MoESettings

        return MoESettings.from_dict(self.model.config.moe)

    def with_experts(self, settings, *, router_state=None, domain_field: str = "modality") -> MoEVLM:
        """Already an MoE model: the same settings are a no-op (a resumed stage), others an error."""
        if settings.to_dict() != self.settings.to_dict():
            raise ValueError("the model already has experts, made with other moe settings; a moe section converts "
                             "a dense model, so remove it from this stage")
        return self

    # ---- parts --------------------------------------------------------------------------------------------

    def part_of(self, parameter_name: str) -> str:
        components = parameter_name.split(".")
        if set(components).intersection(LORA_COMPONENTS):
            return "lora"
        if "language_model" in components and "mlp" in components:
            after_mlp = components[len(components) - components[::-1].index("mlp"):]
            inside = after_mlp[0] if after_mlp else ""
            if inside == "gate":
                return "router"
            if inside in ("experts", "shared_expert", "shared_expert_gate"):
                return "experts"
            return "ffn"   # the FFN of a layer without experts
        return super().part_of(parameter_name)

    def lora_parameter_targets(self) -> list[str]:
        """Fused expert weights PEFT's LoRA can adapt (``target_parameters``): rank r per expert."""
        from medtune.models.moe import layers as moe

        names = set()
        for _, block in moe.moe_blocks(self.model):
            names.update(f"mlp.experts.{name}" for name, _ in block.experts.named_parameters(recurse=False)
                         if not name.endswith("_bias"))
        return sorted(names)

    # ---- the training loss ----------------------------------------------------------------------------------

    def training_loss(self, model, inputs: dict[str, Any], num_items_in_batch=None,
                      speedups: Speedups | None = None):
        from medtune.models.moe import layers as moe

        loss, outputs = super().training_loss(model, inputs, num_items_in_batch, speedups)
        self._count_routing(inputs)
        settings = self.settings
        if settings.aux_loss_coef or settings.z_loss_coef:
            mask = inputs.get("attention_mask")
            aux = moe.auxiliary_losses(model, settings, attention_mask=mask if mask is not None and mask.dim() == 2
                                       else None)
            extra = settings.aux_loss_coef * aux["balance"] + settings.z_loss_coef * aux["z"]
            if num_items_in_batch is not None:
                # the LM loss is a sum over the accumulated batch divided by its labelled tokens; the router
                # losses are per micro-batch means, so each gets the share of this micro-batch's labelled tokens
                labelled = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
                extra = extra * labelled / num_items_in_batch
            loss = loss + extra
        return loss, outputs

    def _count_routing(self, inputs: dict[str, Any]) -> None:
        """Add the batch's tokens to the per-domain expert counts (training only; needs the carried domain)."""
        metadata, index = inputs.get(SAMPLE_METADATA), inputs.get(SAMPLE_INDEX)
        if metadata is None or index is None:
            return
        import torch

        from medtune.models.moe import layers as moe

        if self.routing is None:
            self.routing = RoutingCounts()
        groups = torch.tensor([self.routing.group(m.get(self.domain_field) if m else None) for m in metadata] + [-1])
        token_groups = groups[index.clamp(min=-1)].reshape(-1)   # index -1 (padding) reads the trailing -1
        counts = moe.routing_counts(self.model, token_groups, num_groups=len(self.routing.names))
        self.routing.add(counts)

    def observe_prompts(self, conversations: list, images: list, metadata: list[dict]) -> None:
        """One forward pass over the batch's prompts (as generation's prefill sees them) to count which expert
        each domain's prompt tokens go to."""
        import torch

        from medtune.models.moe import layers as moe
        from medtune.models.generation import _collate_left_padded

        if not any(self.domain_field in m for m in metadata):
            return
        if self.eval_routing is None:
            self.eval_routing = RoutingCounts()
        encodings = [self.encode_prompt(list(c), list(i)) for c, i in zip(conversations, images)]
        batch = _collate_left_padded(encodings, self.tokenizer.pad_token_id, self.model)
        groups = torch.tensor([self.eval_routing.group(m.get(self.domain_field)) for m in metadata])
        token_groups = torch.where(batch["attention_mask"].bool().cpu(), groups[:, None], -1).reshape(-1)
        with torch.inference_mode():
            self.model(**batch, use_cache=False)
        self.eval_routing.add(moe.routing_counts(self.model, token_groups, num_groups=len(self.eval_routing.names)))

    def write_eval_report(self, out_dir: str | Path, *, suffix: str = "") -> list[Path]:
        if self.eval_routing is None or not self.eval_routing.names:
            return []
        from medtune.models.moe import layers as moe

        layers = [name for name, _ in moe.moe_blocks(self.model)]
        return self.eval_routing.write(Path(out_dir), layers, self.domain_field, suffix=suffix)

    # ---- reports and saving ---------------------------------------------------------------------------------

    def write_stage_report(self, directory: str | Path) -> None:
        if self.routing is not None and self.routing.names:   # samples carried their domain
            from medtune.models.moe import layers as moe

            layers = [name for name, _ in moe.moe_blocks(self.model)]
            self.routing.write(Path(directory), layers, self.domain_field)

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "domain_field": self.domain_field}

    def describe(self) -> list[str]:
        settings = self.settings
        lines = super().describe()
        lines.insert(-2, f"experts: {settings.num_experts} per MoE layer in layers {self.model.config.moe_layers}, "
                         f"top-{settings.top_k}, shared expert {'on' if settings.shared_expert else 'off'}, "
                         f"{'renormalised' if settings.renormalize else 'raw'} routing weights, "
                         f"{'dropless' if settings.capacity_factor is None else f'capacity {settings.capacity_factor}'}")
        return lines


def _fields_of(vlm: ComposedVLM) -> dict[str, Any]:
    return {name: getattr(vlm, name) for name in ("model", "tokenizer", "processor", "image_processor", "template",
                                                  "image_token", "image_token_id", "image_size", "spec",
                                                  "sample_metadata", "image_tokens_per_image", "pad_mode")}


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
