"""The names a batch is built with, defined once for the kinds that encode samples, the collators that batch
them (:mod:`medtune.models.collate`, :mod:`medtune.models.packing`) and the trainer that counts their tokens.
Plain constants: importing this module costs nothing.
"""
IGNORE_INDEX = -100                   # a label position the loss skips (the prompt, image tokens, padding)
TOKEN_KEYS = ("input_ids", "attention_mask", "labels")
SAMPLE_METADATA = "sample_metadata"   # the batch key that carries each sample's metadata (a list, sample order)
SAMPLE_INDEX = "sample_index"         # [B, L]: which sample of the batch each position holds (-1: padding)
ROPE_POSITIONS = "rope_position_ids"  # a sample's own multimodal rotary positions, [3, L] (Qwen2-VL family)
