"""MedtuneTrainer: Hugging Face Trainer with medtune's per-part optimizer groups and atomic checkpoints.

Only these hooks are overridden, each for one reason:

* ``compute_loss``: the model's kind computes the loss (``vlm.training_loss``: the sample metadata it carries
  taken out of the batch, and its exact speed-ups, e.g. the LM head only at labelled positions), with the
  same normalisation as Trainer's (sum over labelled tokens / tokens in the accumulated batch).
* ``create_optimizer``: one parameter group per trainable part with that part's learning rate
  (:func:`medtune.train.parts.parameter_groups`, parts as the model's kind assigns them); Trainer's scheduler
  then scales every group from its own peak. Overriding the method (rather than passing an optimizer in) keeps Trainer's ordering under FSDP and
  DeepSpeed, where the optimizer must be built after the model is wrapped.
* ``_save_checkpoint``: after Trainer has written everything (weights, optimizer, scheduler, RNG states,
  trainer state with the data position), all ranks meet and the main process writes the completion marker
  and rotates old complete checkpoints (:mod:`medtune.train.checkpoints`). Trainer's own rotation is off
  (``save_total_limit=None``) because it would count a half-written directory.
* ``_save``: a checkpoint also gets what the kind's export hook writes beside the weights
  (``vlm.write_beside_weights``: image processor, medtune.json ...), so every checkpoint loads and merges on
  its own.
* ``_load_from_checkpoint``: Trainer (transformers 5.23) reloads ``model.safetensors`` with a bare
  ``load_state_dict(strict=False)``, but ``save_pretrained`` writes LLaVA's weights under their original
  (legacy) names (``language_model.model.layers...``), so on resume no key matches and the weights silently stay
  as they were. medtune reloads them through ``from_pretrained``, which maps the names, and checks that every
  parameter was restored.
* ``_get_train_sampler``: length grouping uses medtune's sampler on the encoded rows' lengths instead of
  decoding every sample's images to measure them.
* ``_track_num_input_tokens``: packed batches have no attention mask; non-padding tokens are counted from the
  ids so tokens/s means useful tokens either way.
* ``train``: runs with the torch threads of :class:`MedtuneTrainingArguments` (chosen from the usable cores by
  :mod:`medtune.train.machine`, or set by the stage; with ``adapt_threads``, fewer while other processes keep
  cores busy: :class:`medtune.train.machine.ThreadGovernor`), restoring the process's count afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import Trainer, TrainerCallback, TrainingArguments

from medtune.models.sampler import DEFAULT_MEGA_BATCH_FACTOR, LengthGroupedSampler
from medtune.train import checkpoints, machine
from medtune.train.parts import parameter_groups
from medtune.train.recipe import LearningRates


@dataclass
class MedtuneTrainingArguments(TrainingArguments):
    """TrainingArguments plus the torch threads the loop runs with (torch has one process-wide setting)."""

    torch_threads: int | None = field(default=None, metadata={"help": "torch intra-op threads while training; "
                                                                      "None leaves the process's setting"})
    adapt_threads: bool = field(default=False, metadata={"help": "run torch_threads at most, fewer while other "
                                                                 "processes keep cores busy (ThreadGovernor)"})
    length_group_batches: int = field(default=DEFAULT_MEGA_BATCH_FACTOR, metadata={
        "help": "with group_by_length: batches per length-sorted mega-batch (medtune.models.sampler)"})


class MedtuneTrainer(Trainer):
    def __init__(self, *args, vlm, learning_rates: LearningRates, keep_last_k: int = 2, pad_token_id: int = 0,
                 objective=None, **kwargs):
        from medtune.train.objectives.sft import SFT

        self.vlm = vlm
        self.objective = objective if objective is not None else SFT()
        self.learning_rates = learning_rates
        self.pad_token_id = pad_token_id
        self.keep_last_k = keep_last_k
        super().__init__(*args, **kwargs)
        # after Trainer knows its engine: with several processes (DDP, FSDP, ZeRO) every rank runs the model's own
        # wrapped forward, nothing outside it
        self.speedups = vlm.exact_speedups(distributed=self.args.world_size > 1 or self.is_fsdp_enabled
                                           or self.is_deepspeed_enabled)
        if not self.objective.token_normalised:
            # a mean per micro-batch (DPO's over its pairs): Trainer divides it by the accumulation steps, as it
            # does for a model that takes no num_items_in_batch
            self.model_accepts_loss_kwargs = False

    def train(self, *args, **kwargs):
        threads = getattr(self.args, "torch_threads", None)
        if threads is None:
            return super().train(*args, **kwargs)
        with machine.using_threads(threads):
            if not getattr(self.args, "adapt_threads", False):
                return super().train(*args, **kwargs)
            self.thread_governor = machine.ThreadGovernor(threads)
            callback = GovernThreads(self.thread_governor)
            self.add_callback(callback)
            try:
                return super().train(*args, **kwargs)
            finally:
                self.remove_callback(callback)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer divides the loss by the accumulation steps unless the model normalised it by the tokens of the
        # whole accumulated batch, which it does when it accepts loss kwargs (as Trainer.compute_loss assumes).
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss, outputs = self.objective.loss(self.vlm, model, inputs, items, speedups=self.speedups)
        sampled = self.objective.pop_input_tokens()   # answers the objective sampled itself (GRPO)
        if sampled:
            import torch

            self.state.num_input_tokens_seen += int(self.accelerator.gather(torch.tensor(sampled)).sum())
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and items is not None:
            # as Trainer.compute_loss: gradients are averaged over processes, the token count was summed
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:   # a training log: the objective's own metrics since the last one
            logs = {**logs, **self.objective.pop_metrics()}
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups = parameter_groups(opt_model, self.vlm.part_of, self.learning_rates, self.args.weight_decay,
                                      decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)   # every group carries its own
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            checkpoints.mark_complete(folder)
            checkpoints.rotate(folder.parent, self.keep_last_k)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        from medtune.models.export import use_released_layout

        use_released_layout(self.model)   # the released key names, whatever model object Trainer holds now
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.vlm.write_beside_weights(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        weights = Path(resume_from_checkpoint) / "model.safetensors"
        plain = not (self.is_fsdp_enabled or self.is_deepspeed_enabled or hasattr(model, "peft_config"))
        if not (plain and weights.is_file()):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_weights(model, resume_from_checkpoint, model_class=self.vlm.weights_class(model))

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return LengthGroupedSampler(dataset.lengths, self.args.train_batch_size, seed=self.args.seed,
                                        mega_batch_factor=self.args.length_group_batches)
        return super()._get_train_sampler(train_dataset)

    def _track_num_input_tokens(self, inputs) -> None:
        """Packed batches carry no attention mask, or a 4-D block mask (packing mode ``mask``): count the tokens
        that are not padding instead."""
        if "input_ids" not in inputs:   # prompts an objective completes itself (GRPO): counted where it trains
            return
        mask = inputs.get("attention_mask")
        if (mask is not None and mask.dim() == 2) or self.args.include_num_input_tokens_seen == "no":
            return super()._track_num_input_tokens(inputs)
        tokens = (inputs["input_ids"] != self.pad_token_id).sum()
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()


class GovernThreads(TrainerCallback):
    """Lets a :class:`~medtune.train.machine.ThreadGovernor` choose the threads at the start and between steps."""

    def __init__(self, governor):
        self.governor = governor

    def on_train_begin(self, args, state, control, **kwargs):
        self.governor.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.governor.update()


def restore_weights(model, checkpoint: str | Path, *, model_class: type | None = None) -> None:
    """Load a ``save_pretrained`` checkpoint into ``model`` in place, every parameter and buffer accounted for;
    ``model_class`` reads it (default: the model's own class)."""
    # from_pretrained reads safetensors only and applies the model's key mapping; the copy lives on the CPU
    # for the time of load_state_dict.
    saved = (model_class or type(model)).from_pretrained(str(checkpoint), dtype=next(model.parameters()).dtype, device_map="cpu")
    result = model.load_state_dict(saved.state_dict(), strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [name for name in result.missing_keys if name not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint {checkpoint} does not match the model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
