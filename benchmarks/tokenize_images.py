"""Benchmark: `medtune tokenize-images` batched against one image at a time.

One tiny-but-not-trivial Chameleon VQ (the released encoder's layout, narrower and at 256 px: base width 64,
channel multipliers 1-1-2-2-4, an 8,192-code book, 16 x 16 codes per image) is saved to a temporary folder and
tokenizes the bundled VQA-RAD images (data/vqa_rad/images) through :func:`medtune.models.tokenize_images.
tokenize_images` (loading, MedMax preprocessing, encoding, range checks, chunked Parquet, merge), once per batch
size, in one process. Batch size 1 is the one-at-a-time baseline. The codes of every mode must be identical
image by image, and the script says so (exit code 1 if not). ``encoder s`` is the time spent inside the VQ
encoder alone; the rest is loading, preprocessing and writing.

    python benchmarks/tokenize_images.py
    python benchmarks/tokenize_images.py --images 64 --batch-sizes 8,32 --threads 2
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def build_model(out: Path, resolution: int) -> Path:
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    codebook = 8192
    name = lambda code: "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"  # noqa: E731
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{name(c): 4 + c for c in range(codebook)}}
    vocab.update({"<eoss>": 4 + codebook, "<racm3:break>": 5 + codebook, "<image>": 6 + codebook})
    config = ChameleonConfig(
        vocab_size=codebook + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, bos_token_id=0, pad_token_id=1, eos_token_id=2, vocabulary_map=vocab,
        vq_config=dict(embed_dim=64, num_embeddings=codebook, latent_channels=64, resolution=resolution,
                       base_channels=64, channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=1))
    torch.manual_seed(0)
    ChameleonForConditionalGeneration(config).save_pretrained(out)
    return out


def image_list(folder: Path, limit: int | None, out: Path) -> Path:
    """A CSV (MedMax's ``img_path`` column) of the first ``limit`` images of ``folder``, sorted by name."""
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    out.write_text("img_path\n" + "".join(f"{name}\n" for name in names))
    return out


def timed_run(images_csv: Path, image_root: Path, tokenizer, batch_size: int, out: Path) -> dict:
    from medtune.models.tokenize_images import read_codes, tokenize_images

    encode, encoder_seconds = tokenizer.encode_pixels, [0.0]

    def timed_encode(pixels):
        start = time.perf_counter()
        codes = encode(pixels)
        encoder_seconds[0] += time.perf_counter() - start
        return codes

    tokenizer.encode_pixels = timed_encode
    try:
        start = time.perf_counter()
        result = tokenize_images(images_csv, out, tokenizer, image_root=image_root, batch_size=batch_size,
                                 progress=False)
        wall = time.perf_counter() - start
    finally:
        del tokenizer.encode_pixels
    return {"batch": batch_size, "images": result.tokenized, "wall": wall, "encoder": encoder_seconds[0],
            "codes": read_codes(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=None, help="the first N images (default: all 315)")
    parser.add_argument("--batch-sizes", default="8,32", help="batched modes to compare with batch size 1")
    parser.add_argument("--resolution", type=int, default=256, help="the VQ's image size in pixels")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where the VQ runs (cpu, cuda, ...)")
    args = parser.parse_args(argv)

    import contextlib
    import io

    import torch

    from medtune.models.vq import image_tokenizer
    from medtune.paths import bundled_data

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = bundled_data("vqa_rad", "images")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = image_tokenizer(build_model(tmp / "model", args.resolution), device=args.device)
        images_csv = image_list(folder, args.images, tmp / "images.csv")
        runs = []
        for batch_size in [1] + [int(b) for b in args.batch_sizes.split(",")]:
            with contextlib.redirect_stderr(io.StringIO()):  # the per-chunk progress lines
                runs.append(timed_run(images_csv, folder, tokenizer, batch_size, tmp / f"codes-{batch_size}.parquet"))
    baseline = runs[0]
    print(f"Chameleon VQ at {args.resolution} px, {tokenizer.codes_per_image} codes/image, code book "
          f"{tokenizer.codebook_size}; {baseline['images']} VQA-RAD images; {args.device}, torch threads "
          f"{torch.get_num_threads()}")
    print("| mode | batch | wall s | encoder s | images/s | vs one at a time | codes identical |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    identical = True
    for run in runs:
        same = run["codes"] == baseline["codes"]
        identical &= same
        mode = "one at a time" if run["batch"] == 1 else "batched"
        print(f"| {mode} | {run['batch']} | {run['wall']:.2f} | {run['encoder']:.2f} | "
              f"{run['images'] / run['wall']:.1f} | {baseline['wall'] / run['wall']:.2f}x | "
              f"{'yes' if same else 'NO'} |")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
