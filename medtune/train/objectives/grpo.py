"""``grpo``: group relative policy optimisation with rewards that are the evaluation's metrics (Shao et al., 2024).

Each step takes a batch of labelled prompts (a question and its reference answer), samples ``group_size``
completions of each with the model's own generation (:meth:`medtune.models.generation.Generator.sample`; the
discrete kind's generation never writes image codes into a text answer), scores every completion with the
recipe's rewards (:mod:`medtune.eval.rewards`: ``strict``, ``strict-closed``, ``mcq-letter``, ``vlmevalkit``,
``medmax`` and ``judge`` are the metric families' per-answer figures, ``format`` the ``<think>/<answer>``
layout; weighted and summed), and normalises each reward within its group into an advantage
``(r - mean) / (std + 1e-4)``. The loss is GRPO's: per completion token ``-(ratio * advantage) + beta * KL``, with
``ratio = exp(log p - log p.detach())`` (one update per rollout, so the ratio is 1 and PPO's clipping never acts)
and the KL to the reference written as ``exp(ref - log p) - (ref - log p) - 1`` (the estimator GRPO uses).
``normalise`` says how tokens are averaged: ``token``, every completion token of the batch weighs the same (DAPO's
token-level loss); ``sequence``, each completion's tokens are averaged first and completions then (the GRPO
paper's). The model kind's extra losses (the experts' router losses) are added, as for every objective.

The reference is the stage's starting model (:mod:`medtune.train.objectives.reference`); with ``beta: 0`` no
reference forward runs. Sampling draws from torch's RNG, which Trainer's checkpoints save, so a resumed stage
samples what an uninterrupted one would. Logged per step: ``reward`` (weighted), ``reward/<name>`` per function,
``reward_std`` (the mean spread within groups), ``kl`` and ``completion_length``.

Log-probabilities are taken at the sampling temperature (the logits divided by it), for the policy and the
reference alike. Limits: no packing or length grouping (a batch is prompts, not rows); no eval_data (a GRPO stage
has no validation loss: evaluate its model with ``medtune eval run``); generation runs in the training process
(HF ``generate`` on the unwrapped model: one process, DDP or LoRA, not FSDP or ZeRO-3 sharding, not vLLM); dropout
(LoRA's included) stays on in the policy's forward while answers are sampled without it, so set it to 0; no
routing report for models with experts; prompts and their images are kept in memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from medtune.models.batch import IGNORE_INDEX
from medtune.train.data import EncodedDataset
from medtune.train.objectives.base import Objective
from medtune.train.objectives.reference import Reference
from medtune.validation import Int, Mapping, Number, Str, section

NORMALISATIONS = ("token", "sequence")


@section
@dataclass
class GRPOSettings:
    """A GRPO stage's ``grpo`` section."""

    group_size: Int = 4
    """Completions sampled per prompt (the group its advantages are normalised in)."""
    beta: Number = 0.04
    """Weight of the KL term to the reference (0: no reference)."""
    temperature: Number = 1.0
    max_new_tokens: Int = 16
    rewards: Mapping = field(default_factory=lambda: {"strict": 1.0})
    """Reward functions (:data:`medtune.eval.rewards.REWARDS`) and their weights."""
    judge: Mapping | None = None
    """``{base_url, model}`` of an OpenAI-compatible judge, for the ``judge`` reward (and ``medmax``'s open
    answers); its key comes from $MEDTUNE_JUDGE_API_KEY."""
    normalise: Str = "token"
    """``token`` (every completion token of the batch weighs the same) or ``sequence`` (per completion first)."""

    def __post_init__(self) -> None:
        from medtune.eval.rewards import REWARDS

        for name in ("group_size", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (name == "group_size"
                                                                                       and value < 2):
                raise ValueError(f"{name}: must be an integer of at least {2 if name == 'group_size' else 1}, "
                                 f"got {value!r}")
        for name, low, high in (("beta", 0.0, math.inf), ("temperature", 1e-6, 2.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and low <= value <= high):
                bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
                raise ValueError(f"{name}: must be a number {bounds}, got {value!r}")
        if not isinstance(self.rewards, dict) or not self.rewards:
            raise ValueError(f"rewards: a mapping of reward names to weights, e.g. {{strict: 1.0}}, got {self.rewards!r}")
        for name, weight in self.rewards.items():
            if name not in REWARDS:
                raise ValueError(f"rewards: unknown reward {name!r} (known: {', '.join(REWARDS)})")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"rewards.{name}: the weight must be a number, got {weight!r}")
        if "judge" in self.rewards and self.judge is None:
            raise ValueError("judge: the judge reward needs a judge endpoint, e.g. {base_url: http://127.0.0.1:8000/v1, "
                             "model: NAME}")
        if self.judge is not None and (set(self.judge) != {"base_url", "model"} or not all(
                isinstance(v, str) and v for v in self.judge.values())):
            raise ValueError(f"judge: give base_url and model (strings) only, got {sorted(self.judge)}")
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise: {self.normalise!r} is not one of {', '.join(NORMALISATIONS)}")


class GRPO(Objective):
    name: ClassVar[str] = "grpo"
    token_normalised: ClassVar[bool] = False   # a mean per micro-batch of prompts

    def __init__(self) -> None:
        self.reference = Reference()
        self.settings = GRPOSettings()
        self.generator = None
        self.input_tokens = 0

    # ---- settings ---------------------------------------------------------------------------------------

    def problems(self, stage, where: str) -> list[str]:
        problems = super().problems(stage, where)
        if stage.packing:
            problems.append(f"{where}.packing: a GRPO stage's batches are prompts it completes; remove packing")
        if stage.group_by_length:
            problems.append(f"{where}.group_by_length: a GRPO stage's batches are prompts; remove it")
        if stage.eval_data is not None:
            problems.append(f"{where}.eval_data: a GRPO stage has no validation loss; evaluate its model with "
                            "medtune eval run")
        return problems

    # ---- data: labelled prompts -------------------------------------------------------------------------

    def dataset(self, spec, vlm, *, max_length: int, seed: int, cache_dir, progress: bool = True):
        """(prompts, tally): each labelled question encoded as a generation prompt, with its reference answer."""
        from medtune.data.jsonl import Tally
        from medtune.train.data import encode_each

        tally = Tally()
        rows = encode_each(spec, lambda sample, root: _prompt_row(vlm, sample, root, max_length), tally=tally,
                           seed=seed, what="prompts")
        return PromptDataset(rows), tally

    def rows(self, dataset, stage):
        return dataset

    def collator(self, collator, vlm):
        return collate_prompt_rows

    def count_tokens(self, dataset) -> tuple[int, int]:
        return sum(dataset.lengths), 0   # completions are sampled while training

    # ---- rollouts and the loss --------------------------------------------------------------------------

    def prepare(self, vlm, model, stage) -> None:
        from medtune.models.generation import Generator

        self.settings = stage.grpo if stage.grpo is not None else GRPOSettings()
        self.generator = Generator(vlm)
        self.judge = None
        if self.settings.judge is not None:
            import os

            from medtune.eval.judge import JUDGE_KEY_ENV, Judge

            self.judge = Judge(self.settings.judge["base_url"], self.settings.judge["model"],
                               api_key=os.environ.get(JUDGE_KEY_ENV))
        if self.settings.beta:
            self.reference.take(vlm, model, bf16=stage.precision == "bf16")

    def loss(self, vlm, model, inputs: dict[str, Any], num_items_in_batch=None, speedups=None):
        import torch

        prompts = inputs["prompts"]
        batch, rewards, named = self._rollouts(vlm, prompts)
        group = self.settings.group_size
        grouped = rewards.view(-1, group)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        if model.training:
            self.input_tokens += int(batch["attention_mask"].sum())
        temperature = self.settings.temperature   # the distribution the answers were sampled from
        token_logps, rows = vlm.labelled_token_logps(model, batch, speedups, temperature=temperature)
        extra = vlm.auxiliary_loss(model, batch)   # from the policy's forward, before the reference's
        per_token = -torch.exp(token_logps - token_logps.detach()) * advantages.to(token_logps.device)[rows]
        kl = torch.zeros_like(token_logps)
        if self.settings.beta:
            reference, _ = self.reference.token_logps(vlm, model, batch, speedups, temperature=temperature)
            delta = reference - token_logps
            kl = torch.exp(delta) - delta - 1
            per_token = per_token + self.settings.beta * kl
        loss = self._average(per_token, rows, rewards.shape[0])
        if extra is not None:
            loss = loss + extra
        if model.training:
            lengths = torch.bincount(rows, minlength=rewards.shape[0]).float()
            self._record(rewards, named, grouped, kl, lengths)
        return loss, {"loss": loss}

    def _rollouts(self, vlm, prompts: list[dict]):
        """The training batch of every prompt's ``group_size`` completions (labels on the completion tokens, up to
        and with the end of turn), its rewards [B * G] and the rewards per function."""
        import dataclasses

        import torch

        from medtune.eval.rewards import rewards as rewards_of
        from medtune.models.generation import GenerationSettings

        settings = self.settings
        encodings = [row["prompt"] for row in prompts for _ in range(settings.group_size)]
        training = vlm.model.training
        vlm.model.eval()
        try:
            batch, output = self.generator.sample(encodings, GenerationSettings(
                max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=1.0))
        finally:
            vlm.model.train(training)
        width = batch["input_ids"].shape[1]
        new = output[:, width:]
        ends = torch.isin(new, torch.tensor(self.generator.eos_token_ids, device=new.device))
        after_end = (ends.long().cumsum(1) - ends.long()) > 0
        kept = ~after_end
        texts = [vlm.decode_output(row[mask].tolist())[0] for row, mask in zip(new, kept)]
        answers = [dataclasses.replace(prompts[i // settings.group_size]["item"], prediction=text)
                   for i, text in enumerate(texts)]
        named = {name: torch.tensor(rewards_of(name, answers, judge=self.judge)) for name in settings.rewards}
        if self.judge is not None:
            self.judge.records.clear()   # the verdicts are in the rewards; kept, they would grow every step
        rewards = sum(weight * named[name] for name, weight in settings.rewards.items())
        labels = torch.full_like(output, IGNORE_INDEX)
        labels[:, width:] = torch.where(kept, new, IGNORE_INDEX)
        training_batch = {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask")}
        for key, value in list(training_batch.items()):   # per-token columns (token types): text for the answer
            if torch.is_tensor(value) and value.dim() == 2 and value.shape == batch["input_ids"].shape:
                training_batch[key] = torch.nn.functional.pad(value, (0, new.shape[1]), value=0)
        training_batch.update(input_ids=output, labels=labels,
                              attention_mask=torch.cat([batch["attention_mask"], kept.long()], dim=1))
        return training_batch, rewards.float(), named

    def _average(self, per_token, rows, completions: int):
        import torch

        from medtune.models.kinds.base import per_row

        if self.settings.normalise == "token":
            return per_token.sum() / max(per_token.numel(), 1)
        answered = torch.bincount(rows, minlength=completions) > 0
        return per_row(per_token, rows, completions, mean=True)[answered].mean()

    def _record(self, rewards, named, grouped, kl, lengths) -> None:
        values = {"reward": rewards.mean(), "reward_std": grouped.std(1).mean(), "completion_length": lengths.mean(),
                  **{f"reward/{name}": value.mean() for name, value in named.items()}}
        if self.settings.beta and kl.numel():   # measured only where there is a reference
            values["kl"] = kl.mean()
        self.record(values)

    def pop_input_tokens(self) -> int:
        tokens, self.input_tokens = self.input_tokens, 0
        return tokens


def _prompt_row(vlm, sample, root, max_length: int) -> dict:
    from medtune.data.schema import ANSWER_LABEL
    from medtune.eval.metrics import Item
    from medtune.models.processing import SkipSample, load_images
    from medtune.models.templates import to_chat_messages

    messages = to_chat_messages(sample)
    truth = sample.meta.answer
    if messages and messages[-1]["role"] == "assistant":
        truth = truth or sample.messages[-1].text
        messages = messages[:-1]
    if not truth:
        raise SkipSample("no reference answer", "a GRPO stage rewards answers against the reference answer")
    prompt = vlm.encode_prompt(messages, load_images(sample.images, root))
    length = int(prompt["input_ids"].shape[-1])
    if length > max_length:
        raise SkipSample("too long", f"the prompt has {length} tokens, over max_length {max_length}")
    meta = sample.meta
    item = Item(id=sample.id, question=sample.question, answer=truth, answer_type=meta.answer_type or "open",
                prediction="", choices=meta.choices, organ=meta.organ, modality=meta.modality,
                answer_label=meta.extra.get(ANSWER_LABEL))   # what the rewards score each completion against
    return {"prompt": prompt, "item": item, "length": length}


class PromptDataset(EncodedDataset):
    """Encoded prompts with their reference answers: ``dataset[i]`` is one row (its prompt's tensors inside)."""

    @property
    def lengths(self) -> list[int]:
        return [row["length"] for row in self.rows]


def collate_prompt_rows(features: list[dict]) -> dict:
    """A batch of prompt rows, kept as rows: the objective completes them itself."""
    return {"prompts": list(features)}
