"""The reference model of the objectives that stay near where a stage started (DPO, GRPO).

Under LoRA the reference is the same model with its adapters switched off (no copy); otherwise a frozen copy of
the stage's starting model, taken by :meth:`Reference.take` before the first step: the stage runner calls the
objective's ``prepare`` before a resumed run loads its checkpoint, so a resumed stage keeps the same reference.
"""
from __future__ import annotations

import contextlib
import copy


class Reference:
    """The reference's log-probabilities of a batch's labelled tokens, never with gradients."""

    def __init__(self) -> None:
        self.frozen = None
        self.bf16 = False

    def take(self, vlm, model, *, bf16: bool = False) -> None:
        """Remember the starting model (nothing to copy when ``model`` carries adapters); ``bf16``: the stage
        trains in bf16 autocast, whose wrapping of the forward the reference's passes then mirror (Accelerate
        wraps the policy's forward; the frozen copy, and the policy before Trainer prepares it, are not)."""
        self.bf16 = bf16
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
        device = next(getattr(model, "module", model).parameters()).device
        with torch.no_grad():
            if self.frozen is None:
                with getattr(model, "module", model).disable_adapter(), _autocast_forward(model, device, self.bf16):
                    return compute(model)
            if next(self.frozen.parameters()).device != device:
                self.frozen.to(device)
            with _autocast_forward(self.frozen, device, self.bf16):
                return compute(self.frozen)


@contextlib.contextmanager
def _autocast_forward(module, device, enabled: bool):
    """``module``'s forward in bf16 autocast, as Accelerate wraps the policy's forward (only the forward: inputs
    the kind prepares outside it, such as frozen image features, stay as the policy's are). Wrapping a forward
    Accelerate has wrapped already changes nothing."""
    if not enabled:
        yield
        return
    import torch

    own = module.__dict__.get("forward")
    module.forward = torch.autocast(device.type, dtype=torch.bfloat16)(module.forward)
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own
