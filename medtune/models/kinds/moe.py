"""The moe kind: a composed model whose LLM has mixture-of-experts layers, saved as ``medtune_moe_vlm``.

Everything about the experts themselves (parts ``experts`` / ``router`` / ``ffn``, the router losses, routing
statistics and reports) is the experts component's (:class:`medtune.models.moe.experts.Experts`), which any kind
can hold; inputs, prompts, the token cache and collation are the composed kind's. What this kind adds is the
model class: ``medtune_moe_vlm`` records the experts in its config and carries its own code, so plain
transformers (``trust_remote_code``) and vLLM load it without medtune. A dense composed model becomes this kind
through :meth:`ComposedVLM.with_experts <medtune.models.kinds.composed.ComposedVLM.with_experts>` (upcycling:
experts copied from the trained FFNs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from medtune.models.kinds.composed import ComposedVLM
from medtune.models.moe.experts import Experts
from medtune.models.moe.settings import MoESettings


@dataclass(kw_only=True)
class MoEVLM(ComposedVLM):
    kind: ClassVar[str] = "moe"

    @classmethod
    def load(cls, source: str, metadata: dict[str, Any] | None, *, model_kwargs: dict, device: str) -> MoEVLM:
        composed = ComposedVLM.load(source, metadata, model_kwargs=model_kwargs, device=device)
        config = composed.model.config
        recorded = (metadata or {}).get("experts") or {}
        domain_field = recorded.get("domain_field") or (metadata or {}).get("domain_field", "modality")
        experts = Experts(settings=MoESettings.from_dict(config.moe), layers=list(config.moe_layers),
                          domain_field=domain_field)
        return cls(**_fields_of(composed), experts=experts)

    @classmethod
    def from_dense(cls, vlm: ComposedVLM, settings: MoESettings, *, router_state: dict | None = None,
                   domain_field: str = "modality") -> MoEVLM:
        """Upcycle a dense composed model: the FFNs of ``settings``' layers become experts (in place, the weights
        are moved, not copied, into the new model)."""
        from medtune.models.moe.model import MedtuneMoEVLMForConditionalGeneration

        model = MedtuneMoEVLMForConditionalGeneration.from_dense(vlm.model, settings, router_state=router_state)
        experts = Experts(settings=settings, layers=list(model.config.moe_layers), domain_field=domain_field)
        fields = _fields_of(vlm)
        fields.update(model=model, sample_metadata=tuple(dict.fromkeys((*vlm.sample_metadata, domain_field))))
        return cls(**fields, experts=experts)

    def weights_class(self, model=None) -> type:
        """``medtune_moe_vlm`` builds its experts from its config."""
        return type(self.model if model is None else model)

    @property
    def settings(self) -> MoESettings:
        return self.experts.settings

    @property
    def domain_field(self) -> str:
        return self.experts.domain_field


def _fields_of(vlm: ComposedVLM) -> dict[str, Any]:
    skipped = {"experts", "_features"}
    return {f.name: getattr(vlm, f.name) for f in dataclasses.fields(vlm) if f.init and f.name not in skipped}
