"""The reference model of the objectives that stay near where a stage started (DPO, GRPO).

Under LoRA the reference is the same model with its adapters switched off (no copy); otherwise a frozen copy of
the stage's starting model, taken by :meth:`Reference.take` before the first step: the stage runner calls the
objective's ``prepare`` before a resumed run loads its checkpoint, so a resumed stage keeps the same reference.
"""
from __future__ import annotations

import copy


class Reference:
    """The reference's log-probabilities of a batch's labelled tokens, never with gradients."""

    def __init__(self) -> None:
        self.frozen = None

    def take(self, vlm, model) -> None:
        """Remember the starting model (nothing to copy when ``model`` carries adapters)."""
        if hasattr(getattr(model, "module", model), "disable_adapter"):
            self.frozen = None
            return
        self.frozen = copy.deepcopy(vlm.model).eval()
        for parameter in self.frozen.parameters():
            parameter.requires_grad_(False)

    def token_logps(self, vlm, model, inputs, speedups=None, *, temperature: float = 1.0):
        """:meth:`VLM.labelled_token_logps <medtune.models.kinds.base.VLM.labelled_token_logps>` of the
        reference (``model``: the policy being trained, whose adapters are switched off when there is no copy)."""
        return self._run(model, lambda m: vlm.labelled_token_logps(m, inputs, speedups, temperature=temperature))

    def logps(self, vlm, model, inputs, speedups=None):
        """Per-row sums of :meth:`token_logps`."""
        return self._run(model, lambda m: vlm.labelled_logps(m, inputs, speedups))

    def release(self) -> None:
        """Drop the frozen copy (its log-probabilities are all computed already); using the reference after this
        is an error."""
        self.frozen, self.released = None, True

    def _run(self, model, compute):
        """``compute`` on the reference, without gradients: the frozen copy (moved to the policy's device first:
        Trainer places the policy, not the copy), else ``model`` with adapters off."""
        import torch

        if getattr(self, "released", False):
            raise RuntimeError("the reference model was released after its log-probabilities were precomputed")
        with torch.no_grad():
            if self.frozen is None:
                with getattr(model, "module", model).disable_adapter():
                    return compute(model)
            device = next(getattr(model, "module", model).parameters()).device
            if next(self.frozen.parameters()).device != device:
                self.frozen.to(device)
            return compute(self.frozen)
