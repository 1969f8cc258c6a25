"""Packing: several encoded samples per row, kept apart so each sees only itself.

Why: medical VQA samples are short and vary in length, so pad-to-longest batches are mostly padding
(benchmarks/padding_vs_packing.py measures it). Packing fills rows up to ``max_length`` instead.

How samples are kept apart (the packed loss of every sample equals its unpacked loss; tests check it):

* ``position_ids`` restart at 0 for every sample, so rotary/absolute positions are those of the sample alone.
* The label of each sample's first token is set to -100: in a packed row that position would otherwise be
  "predicted" from the previous sample's last token (unpacked, the first label is never used either).
* Attention does not cross samples, in one of three ways (``attention=``):
  - ``"position_ids"`` (the collator's default; every implementation): rows are padded, no attention mask is
    passed, and transformers (masking_utils.find_packed_sequence_indices) builds the block-diagonal causal mask
    (flex_attention: a document ``BlockMask``) from the position ids. Padding at the end of a row gets positions 0, 1, ... of its own, so it is a separate
    "sequence" that attends only to itself. transformers skips this detection when a KV cache exists, and
    a causal LM creates one whenever ``use_cache`` is on, so the batch carries ``use_cache=False``.
  - ``"mask"`` (eager and SDPA; also for models that do not detect packing): an explicit 4D additive mask
    [B, 1, L, L] (0 where allowed, dtype-min elsewhere), block-diagonal and causal; transformers passes a
    4D mask through unchanged.
  - ``"flatten"`` (flash-attention varlen on GPU): all samples of the batch in one row [1, total] without
    padding, plus ``cu_seq_lens_q/k`` and ``max_length_q/k`` (transformers' FlashAttentionKwargs), the same
    inputs as DataCollatorWithFlattening; flash_attention_2/3 then run varlen kernels. SDPA/eager derive a
    block mask from the position ids, so this mode also works (slowly) on CPU.
* Image features are scattered into image-token positions in row-major order over the batch, so pixel
  values are concatenated in the order of the samples within each row, rows in order. Token columns a model's
  processor adds beside the ids (Gemma 3's ``token_type_ids``, Qwen2-VL's ``mm_token_type_ids``: lists as long
  as the sample) are packed exactly like the ids, padded with 0. Samples that carry their own multimodal
  rotary positions (``rope_position_ids``, [3, L]: Qwen2-VL) get ``position_ids`` of shape [4, B, L], the
  restarting text positions first (what transformers reads packed sequences from), then theirs.

Which mode (a stage's ``packing`` setting; :func:`packing_mode`): ``true`` takes the default of the model's
attention implementation, ``flatten`` under flash-attention (varlen kernels, no padding), ``mask`` under SDPA
(an explicit block mask), ``position_ids`` under flex_attention (transformers builds flex's document
``BlockMask`` from the restarting positions) and eager. Refused pairs (:func:`pair_refusal`): ``mask`` with
flash-attention (its kernels take no mask) and with flex_attention (a dense 4-D mask becomes a per-score
addition: slow everywhere, and torch's CPU flex kernel crashes on it). Every other pair gives the unpacked
per-sample loss (tests/train/test_attention_settings.py). A model kind may refuse more: its collator says
which modes keep its samples apart (:func:`use_packing_mode`).

Row planning (:func:`plan_rows`): ``best_fit`` (best-fit decreasing: longest sample first, each into the
fullest row it still fits; deterministic; near-optimal fill) or ``greedy`` (data order kept, a new row when the
next sample does not fit; lets a shuffled order through unchanged).
"""
from __future__ import annotations

import bisect
from typing import Any, Sequence

from medtune.models.batch import IGNORE_INDEX, ROPE_POSITIONS, SAMPLE_INDEX
from medtune.models.collate import _image_columns, sample_metadata

STRATEGIES = ("best_fit", "greedy")
ATTENTION_MODES = ("position_ids", "mask", "flatten")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2")
FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
_NOT_TOKEN_COLUMNS = ("input_ids", "labels", "attention_mask", "position_ids")


def default_mode(attn_implementation: str | None) -> str:
    """The packed-attention mode a stage's ``packing: true`` means under ``attn_implementation``."""
    if attn_implementation in FLASH_IMPLEMENTATIONS:
        return "flatten"
    return "mask" if attn_implementation == "sdpa" else "position_ids"


def pair_refusal(mode: str, attn_implementation: str | None) -> str | None:
    """Why packing ``mode`` cannot run under ``attn_implementation`` (None when it can)."""
    if mode == "mask" and attn_implementation in FLASH_IMPLEMENTATIONS:
        return (f"{attn_implementation} kernels take no attention mask, so an explicit block mask cannot keep "
                "samples apart; use flatten (varlen, the default) or position_ids")
    if mode == "mask" and attn_implementation == "flex_attention":
        return ("flex_attention reads a dense 4-D mask as a per-score addition (slow, and torch's CPU flex kernel "
                "crashes on it); use position_ids, from which transformers builds flex's document BlockMask")
    return None


def packing_mode(setting, attn_implementation: str | None) -> str:
    """The mode of a stage's ``packing`` setting (``true`` or a mode name); ValueError for a refused pair."""
    if setting is True:
        return default_mode(attn_implementation)
    if setting not in ATTENTION_MODES:
        raise ValueError(f"{setting!r} is not a packing mode ({', '.join(ATTENTION_MODES)}, or true)")
    reason = pair_refusal(setting, attn_implementation)
    if reason:
        raise ValueError(f"{setting!r} with attn_implementation {attn_implementation!r}: {reason}")
    return setting


def use_packing_mode(collator, setting, attn_implementation: str | None) -> str:
    """Set the mode of the packing collator inside ``collator`` (kinds wrap it, each wrapper holding the next
    as ``.collator``) and return it. A wrapper with ``check_packing_mode`` may refuse a mode for its model;
    ``packing: true`` then falls back to position_ids."""
    mode = packing_mode(setting, attn_implementation)
    wrappers, node = [], collator
    while not isinstance(node, PackingCollator):
        if node is None:
            raise ValueError("the stage's collator does not pack")
        wrappers.append(node)
        node = getattr(node, "collator", None)
    try:
        for wrapper in wrappers:
            getattr(wrapper, "check_packing_mode", lambda mode: None)(mode)
    except ValueError:
        if setting is not True or mode == "position_ids":
            raise
        mode = "position_ids"
    node.attention = mode
    return mode


def plan_rows(lengths: Sequence[int], max_length: int, strategy: str = "best_fit") -> list[list[int]]:
    """Group sample indices into rows whose total length is at most ``max_length``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"packing strategy must be one of {STRATEGIES}, got {strategy!r}")
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens > max_length {max_length} "
                         "(encode with the same max_length so it is truncated or skipped first)")
    if strategy == "greedy":
        rows, used = [], max_length + 1
        for index, n in enumerate(lengths):
            if used + n > max_length:
                rows.append([])
                used = 0
            rows[-1].append(index)
            used += n
        return rows
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: the first fit found is the best fit
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[index]
        position = bisect.bisect_left(free, (n, -1))
        if position < len(free):
            space, row = free.pop(position)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(index)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return rows


class PackedDataset:
    """A map-style dataset of packed rows: item ``i`` is the list of encoded samples in row ``i``."""

    def __init__(self, dataset, max_length: int, *, strategy: str = "best_fit",
                 lengths: Sequence[int] | None = None):
        self.dataset = dataset
        lengths = lengths if lengths is not None else [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
        self.rows = plan_rows(lengths, max_length, strategy)
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[dict]:
        return [self.dataset[i] for i in self.rows[index]]


def _row_tokens(samples: Sequence[dict]) -> tuple[list[int], list[int], list[int]]:
    ids, labels, positions = [], [], []
    for sample in samples:
        n = len(sample["input_ids"])
        ids += list(sample["input_ids"])
        sample_labels = list(sample.get("labels", [IGNORE_INDEX] * n))
        labels += [IGNORE_INDEX] + sample_labels[1:]
        positions += list(range(n))
    return ids, labels, positions


def token_columns(samples: Sequence[dict]) -> list[str]:
    """Keys of per-token integer columns beside the ids (lists as long as the sample's ids)."""
    return sorted({key for sample in samples for key, value in sample.items()
                   if key not in _NOT_TOKEN_COLUMNS and isinstance(value, list)
                   and len(value) == len(sample["input_ids"]) and all(isinstance(v, int) for v in value[:1])})


def block_causal_mask(sequence_ids, dtype=None):
    """[B, 1, L, L] additive mask: token i sees token j iff same sequence id and j <= i."""
    import torch

    dtype = dtype or torch.float32
    length = sequence_ids.shape[1]
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device).tril()
    allowed = (same & causal)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def pack_rows(rows: Sequence[Sequence[dict]], pad_token_id: int, *, attention: str = "position_ids",
              mask_dtype=None) -> dict[str, Any]:
    """Tensors for a batch of packed rows (see the module docstring for the ``attention`` modes)."""
    import torch

    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    samples = [sample for row in rows for sample in row]
    if attention == "flatten":
        rows = [samples]
    built = [_row_tokens(row) for row in rows]
    longest = max(len(ids) for ids, _, _ in built)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    sequence_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, ((ids, row_labels, positions), row) in enumerate(zip(built, rows)):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        labels[r, :n] = torch.tensor(row_labels)
        # the padding tail counts as one more sequence with its own positions (it then attends only to itself)
        position_ids[r] = torch.tensor(positions + list(range(longest - n)))
        lengths = [len(sample["input_ids"]) for sample in row] + ([longest - n] if longest > n else [])
        sequence_ids[r] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if any(sample.get(ROPE_POSITIONS) is not None for sample in samples):
        batch["position_ids"] = torch.cat([position_ids[None], _rope_rows(rows, longest)])
    for key in token_columns(samples):
        column = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, row in enumerate(rows):
            values = [v for sample in row for v in (sample.get(key) or [0] * len(sample["input_ids"]))]
            column[r, :len(values)] = torch.tensor(values, dtype=torch.long)
        batch[key] = column
    if attention == "mask":
        batch["attention_mask"] = block_causal_mask(sequence_ids, mask_dtype)
    else:
        batch["use_cache"] = False  # with a cache, transformers would not detect the packed sequences
    if attention == "flatten":
        lengths = torch.tensor([len(sample["input_ids"]) for sample in samples])
        cu_seq_lens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        batch.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
                     max_length_q=int(lengths.max()), max_length_k=int(lengths.max()))
    batch.update(_image_columns(samples))
    carried = sample_metadata(samples)   # in sample order: row by row, as the pixels
    if carried:
        index = torch.full((len(rows), longest), -1, dtype=torch.long)
        first = 0
        for r, row in enumerate(rows):
            lengths = torch.tensor([len(sample["input_ids"]) for sample in row])
            index[r, : int(lengths.sum())] = torch.repeat_interleave(torch.arange(first, first + len(row)), lengths)
            first += len(row)
        carried[SAMPLE_INDEX] = index
    batch.update(carried)
    return batch


def _rope_rows(rows, longest: int):
    """[3, B, L]: each sample's own multimodal positions, one row after another; padding counts up from 0."""
    import torch

    out = torch.zeros((3, len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            n = len(sample["input_ids"])
            positions = sample.get(ROPE_POSITIONS) or [list(range(n))] * 3
            out[:, r, start:start + n] = torch.tensor(positions, dtype=torch.long)
            start += n
        out[:, r, start:] = torch.arange(longest - start)
    return out


def sample_spans(position_ids_row) -> list[tuple[int, int]]:
    """(start, end) of every sequence in a packed row, read from where the positions restart at 0."""
    positions = [int(p) for p in position_ids_row]
    starts = [i for i, p in enumerate(positions) if p == 0]
    return list(zip(starts, starts[1:] + [len(positions)]))


class PackingCollator:
    """A DataCollator for Trainer that packs.

    Features are either rows already planned by :class:`PackedDataset` (each a list of samples), or single
    samples, which are then packed into rows of at most ``max_length`` tokens within the batch (best fit).
    """

    def __init__(self, pad_token_id: int, max_length: int | None = None, *, attention: str = "position_ids",
                 mask_dtype=None):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.pad_token_id = pad_token_id
        self.max_length, self.attention, self.mask_dtype = max_length, attention, mask_dtype

    def __call__(self, features: Sequence[dict] | Sequence[Sequence[dict]]) -> dict[str, Any]:
        if features and isinstance(features[0], dict):
            if self.max_length is None:
                raise ValueError("PackingCollator got single samples: give max_length to pack them into rows")
            plan = plan_rows([len(f["input_ids"]) for f in features], self.max_length)
            features = [[features[i] for i in row] for row in plan]
        return pack_rows(features, self.pad_token_id, attention=self.attention, mask_dtype=self.mask_dtype)
