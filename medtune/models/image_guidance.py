"""Image codes picked as Chameleon's own image decoder picks them: classifier-free guidance over three prompt
streams, then a draw restricted to image codes.

Facts from Chameleon's inference code, as MedMax vendors and runs it (github.com/Hritikbansal/medmax at 20b7055:
``chameleon/inference/chameleon.py`` ``Options.Image`` and ``ImageDecoder._split_inputs_for_cfg``,
``chameleon/inference/logits_processor.py`` ``InBatchInstructCFGLogitsProcessor``, ``token_selector.py``
``ReplicatedInputTokenSelector``, ``model_adapter.py``):

* Once a row writes the begin-of-image token, three streams run side by side: the whole sequence so far
  (*full*: the condition is text and images); that sequence with only BOS, image codes and begin/end-of-image
  tokens kept (*image*: the condition is the images alone); and ``[BOS, begin-of-image]`` (*none*).
* Each step mixes their raw logits: ``none + s_image * (image - none) + s_text * (full - image)``, with
  ``s_text = 3.0`` and ``s_image = 1.2`` by default. Then only image codes are allowed, the logits are divided by
  the temperature (0.7), cut to the top-p nucleus (0.9) and one code is drawn (the argmax when greedy). The code
  is appended to all three streams.
* Chameleon runs the streams as separate sequences (its model adapter packs them without padding), so here each
  extra stream runs on its own, batch of one, with its own cache; the *full* stream is ``generate``'s own pass.
  Where nothing before the image is an image, the *image* stream holds what the *none* stream holds, so it runs
  once for both (the same logits: the guidance reduces to ``none + s_text * (full - none)``).

The settings are :class:`medtune.models.generation.ImageSampling`. With both scales 1 the mix is the *full* logits,
so no extra stream runs (``ImageSampling.guided`` is false).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from medtune.models.generation import ImageSampling


def guided_logits(full: torch.Tensor, image: torch.Tensor, none: torch.Tensor, sampling: ImageSampling) -> torch.Tensor:
    """The mix of the three streams' raw logits."""
    return none + sampling.guidance_image * (image - none) + sampling.guidance_text * (full - image)


def pick_code(logits: torch.Tensor, sampling: ImageSampling) -> int:
    """Index of the picked entry of ``logits`` (one row, image codes only): the argmax when the temperature is 0,
    else a draw after transformers' temperature and top-p warpers, as Chameleon's decoder chains them (from
    torch's global generator, which medtune's Generator seeds when a seed is given)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    warped = TopPLogitsWarper(sampling.top_p)(None, TemperatureLogitsWarper(sampling.temperature)(None, logits[None]))
    return int(torch.multinomial(torch.softmax(warped.float(), dim=-1), 1))


class GuidanceStreams:
    """The *image* and *none* streams of each row that is writing an image, advanced one code at a time."""

    def __init__(self, model: Any, *, bos: int, boi: int, eoi: int, image_ids: Sequence[int], pad: int | None,
                 sampling: ImageSampling):
        self.model, self.sampling = model, sampling
        self.bos, self.boi, self.pad = bos, boi, pad
        self.kept = {bos, boi, eoi, *image_ids}
        self.prompt_starts: list[int] | None = None
        self.open: dict[int, list] = {}   # row -> [cache, logits] of the image stream, then of the none stream
        #                                   (one entry when the two are the same sequence)

    def note_prompt(self, input_ids: torch.Tensor) -> None:
        """Where each left-padded prompt starts (generate pads with ``pad``; a pad equal to BOS keeps one BOS)."""
        starts = []
        for row in input_ids.tolist():
            lead = next((i for i, token in enumerate(row) if token != self.pad), len(row))
            starts.append(lead - 1 if lead and self.pad == self.bos else lead)
        self.prompt_starts = starts

    def guide(self, row: int, input_ids: torch.Tensor, full: torch.Tensor, codes_written: int) -> torch.Tensor:
        """The guided logits of ``row``, whose last token is the block's begin (``codes_written == 0``) or its
        latest code."""
        if codes_written == 0:
            context = input_ids[self.prompt_starts[row]:].tolist()
            image_context = [token for token in context if token in self.kept]
            unconditioned = [self.bos, self.boi]
            # no image before this one: the image stream is the unconditioned stream, run once for both
            streams = [image_context] if image_context == unconditioned else [image_context, unconditioned]
            self.open[row] = [self._run([ids]) for ids in streams]
        else:
            latest = [[int(input_ids[-1])]]
            self.open[row] = [self._run(latest, stream[0]) for stream in self.open[row]]
        image, none = self.open[row][0][1], self.open[row][-1][1]
        return guided_logits(full, image.to(full.device), none.to(full.device), self.sampling)

    def close(self, row: int) -> None:
        self.open.pop(row, None)

    def _run(self, ids: list[list[int]], cache=None) -> list:
        tensor = torch.tensor(ids, device=self.model.device)
        outputs = self.model(input_ids=tensor, cache=cache, use_cache=True, logits_to_keep=1)
        return [outputs.cache, outputs.logits[0, -1].float()]
