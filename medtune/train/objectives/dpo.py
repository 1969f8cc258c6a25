"""``dpo``: direct preference optimisation on pairs of replies to the same prompt (Rafailov et al., 2023).

The data are preference samples: a conversation whose last message is the chosen reply, with the rejected reply
beside it (:attr:`medtune.data.schema.Sample.rejected`). Each pair is encoded twice by the model's kind (the
prompt with either reply) and a batch of B pairs is one batch of 2B rows, chosen rows first, through the kind's
own collator, so every kind and its exact speed-ups apply (the LM head runs only where a reply's tokens are).

The loss is DPO's sigmoid form, as TRL's ``DPOTrainer`` computes it by default (``loss_type="sigmoid"``)::

    -log sigmoid(beta * ((log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))))

with ``log p`` the summed log-probability of a reply's tokens, averaged over the pairs of the batch. TRL's loss
is not called: its trainer owns the batching (its collator, its concatenated forward) that medtune's kinds do
here, and the formula is one line. The model kind's extra losses (the experts' router losses) are added, from the
policy's forward.

The reference is the stage's starting model: under LoRA the same model with its adapters disabled (no copy),
otherwise a frozen copy taken before the first step (before a resumed run loads its checkpoint, so a resumed
stage keeps the same reference), moved to the policy's device when it first runs; with ``precompute_reference``
its log-probabilities of every pair are computed once before the first step and the copy released. Logged beside
the loss, as TRL names them: ``rewards/chosen`` and ``rewards/rejected`` (beta times the log-ratio to the
reference), ``rewards/margins`` and ``rewards/accuracies`` (the share of pairs whose chosen reply has the larger
reward).

Limits, refused by name in a recipe: packing and length grouping (a pair's two rows must stay in one batch, in
order). With gradient accumulation each micro-batch's mean is divided by the accumulation steps (Trainer's rule
for losses that are not token sums), so equal micro-batches give the mean over the accumulated pairs. Pairs are
encoded in memory (not through the token cache), pixels included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from medtune.train.objectives.base import Objective
from medtune.train.objectives.reference import Reference
from medtune.validation import Bool, Number, section


@section
@dataclass
class DPOSettings:
    """A DPO stage's ``dpo`` section."""

    beta: Number = 0.1
    """The inverse temperature of the implicit reward: larger keeps the policy nearer the reference."""
    precompute_reference: Bool = False
    """Compute the reference's log-probabilities of every pair once, before the first step, instead of a reference
    forward pass per batch; the frozen copy is then released (kept only for ``eval_data``)."""

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not (
                math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta: must be a number > 0, got {self.beta!r}")


class PairObjective(Objective):
    """What every preference objective shares (DPO, SimPO, ORPO): preference pairs as its data, each pair's two
    rows in one batch (chosen rows first), and a mean over the micro-batch's pairs as its loss."""

    a_stage: ClassVar[str] = "a preference stage"   # how messages name a stage of the method
    token_normalised: ClassVar[bool] = False   # a mean over the micro-batch's pairs

    # ---- settings ---------------------------------------------------------------------------------------

    def problems(self, stage, where: str) -> list[str]:
        problems = super().problems(stage, where)
        if stage.packing:
            problems.append(f"{where}.packing: {self.a_stage} keeps each pair's two rows together; remove "
                            "packing")
        if stage.group_by_length:
            problems.append(f"{where}.group_by_length: {self.a_stage} keeps each pair's two rows together; "
                            "remove it")
        return problems

    # ---- data -------------------------------------------------------------------------------------------

    def dataset(self, spec, vlm, *, max_length: int, seed: int, cache_dir, progress: bool = True):
        """(pairs, tally): each preference sample encoded with its chosen and with its rejected reply."""
        from medtune.data.jsonl import Tally
        from medtune.errors import RecipeError
        from medtune.models.processing import SkipSample
        from medtune.train.data import encode_each

        try:
            vlm.use_label_rule(spec.labels)
        except ValueError as error:
            raise RecipeError(f"data.{error}") from None

        def encode_pair(sample, root) -> tuple[dict, dict]:
            if sample.rejected is None:
                raise SkipSample("no rejected reply", f"{self.a_stage} reads preference pairs (a 'rejected' reply)")
            return tuple(vlm.encode_sample(s, root, max_length=max_length, truncation=spec.truncation)
                         for s in (sample.with_reply(sample.messages[-1]), sample.with_reply(sample.rejected)))

        tally = Tally()
        return PairDataset(encode_each(spec, encode_pair, tally=tally, seed=seed, what="preference pairs")), tally

    def rows(self, dataset, stage):
        return dataset

    def collator(self, collator, vlm):
        return PairCollator(collator)

    # ---- the policy's side of a batch -------------------------------------------------------------------

    @staticmethod
    def policy_token_logps(vlm, model, inputs, speedups):
        """(token log-probabilities, row of each, the kind's extra loss or None) of the policy's forward pass."""
        token_logps, rows = vlm.labelled_token_logps(model, inputs, speedups)
        # what the policy's forward recorded (router logits), read before any other forward replaces it
        extra = vlm.auxiliary_loss(model, inputs)
        if model.training and vlm.experts is not None:
            vlm.experts.count_training_tokens(model, inputs)
        return token_logps, rows, extra

    def record_rewards(self, chosen, rejected) -> None:
        """Log a training batch's implicit rewards of its chosen and rejected replies, as TRL names them."""
        self.record({"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                     "rewards/margins": (chosen - rejected).mean(),
                     "rewards/accuracies": (chosen > rejected).float().mean()})


class DPO(PairObjective):
    name: ClassVar[str] = "dpo"
    a_stage: ClassVar[str] = "a DPO stage"

    def __init__(self) -> None:
        self.reference = Reference()
        self.beta = DPOSettings().beta
        self.policy = None

    def settings(self, stage) -> DPOSettings:
        return stage.dpo if stage.dpo is not None else DPOSettings()

    def prepare(self, vlm, model, stage) -> None:
        """The reference: the adapters switched off under LoRA, else a frozen copy of the starting model."""
        self.beta = self.settings(stage).beta
        self.reference.take(vlm, model, bf16=stage.precision == "bf16")
        self.policy = (vlm, model)

    def collator(self, collator, vlm):
        self.pair_collator = PairCollator(collator)
        return self.pair_collator

    def rows(self, dataset, stage):
        """The pairs; with ``precompute_reference`` each carries its reference log-probabilities, computed here
        (before the first step: by the starting model) in batches of ``batch_size`` pairs."""
        if self.settings(stage).precompute_reference:
            dataset.reference_logps = self._reference_logps(dataset, stage.batch_size)
            if stage.eval_data is None:   # evaluation batches would need it; training ones no longer do
                self.reference.release()
        return dataset

    def _reference_logps(self, dataset, batch_size: int) -> list[tuple[float, float]]:
        import torch

        from medtune.distributed import is_main_process, process_device
        from medtune.progress import progress_bar

        vlm, model = self.policy
        if getattr(model, "hf_device_map", None) is None:   # a quantized model is placed already
            model.to(process_device())   # where Trainer puts it, so the pass runs on the GPU there is
        device = next(model.parameters()).device
        values = []
        with progress_bar(len(dataset), desc="reference log-probs", unit="pairs", enabled=is_main_process()) as bar:
            for start in range(0, len(dataset), batch_size):
                batch = self.pair_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                logps = self.reference.logps(vlm, model, batch).tolist()
                pairs = len(logps) // 2
                values += list(zip(logps[:pairs], logps[pairs:]))
                bar.update(pairs)
        return values

    def loss(self, vlm, model, inputs: dict[str, Any], num_items_in_batch=None, speedups=None):
        import torch

        from medtune.models.kinds.base import per_row

        reference = inputs.pop(REFERENCE_LOGPS, None)
        token_logps, rows, extra = self.policy_token_logps(vlm, model, inputs, speedups)
        policy = per_row(token_logps, rows, inputs["labels"].shape[0])
        if reference is None:
            reference = self.reference.logps(vlm, model, inputs, speedups)
        pairs = policy.shape[0] // 2
        rewards = self.beta * (policy - reference)
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        if extra is not None:
            loss = loss + extra
        if model.training:   # evaluation batches are not this step's pairs
            self.record_rewards(chosen, rejected)
        return loss, {"loss": loss}


REFERENCE_LOGPS = "reference_logps"   # a batch key: [2B] precomputed reference log-probabilities, chosen first


class PairDataset:
    """Encoded preference pairs: ``dataset[i]`` is ``{"chosen": row, "rejected": row}``, and ``"reference":
    (chosen, rejected)`` log-probabilities once :attr:`reference_logps` is set."""

    def __init__(self, pairs: list[tuple[dict, dict]]):
        self.pairs = pairs
        self.reference_logps: list[tuple[float, float]] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        chosen, rejected = self.pairs[index]
        if self.reference_logps is None:
            return {"chosen": chosen, "rejected": rejected}
        return {"chosen": chosen, "rejected": rejected, "reference": self.reference_logps[index]}

    @property
    def rows(self) -> list[dict]:
        """Every encoded row, chosen and rejected (for token counts)."""
        return [row for pair in self.pairs for row in pair]

    @property
    def lengths(self) -> list[int]:
        return [len(row["input_ids"]) for row in self.rows]


@dataclass
class PairCollator:
    """B pairs -> one batch of 2B rows through the kind's collator: the chosen rows, then the rejected rows."""

    collator: Any

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collator([f["chosen"] for f in features] + [f["rejected"] for f in features])
        if "reference" in features[0]:
            import torch

            batch[REFERENCE_LOGPS] = torch.tensor([f["reference"][0] for f in features]
                                                  + [f["reference"][1] for f in features], dtype=torch.float32)
        return batch
