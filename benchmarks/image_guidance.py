"""Benchmark: what classifier-free guidance costs an image answer, against the unguided answer in the same run.

A randomly initialised Chameleon (``medtune.models.presets.tiny_chameleon`` at ``--width`` / ``--layers``, with a
VQ of ``--image-size`` px: (image_size / 4)^2 codes per image) and a random pixel decoder answer one prompt with one
image, through medtune's Generator, four ways:

* unguided: guidance scales 1, 1 (only generate's own pass: the baseline of every ratio);
* guided: Chameleon's scales 3.0 / 1.2 (two more streams, each one forward per code with its own cache);
* guided, prompt with an image: the image-only stream then starts from that image's codes too;
* guided, sampled: temperature 0.7, top-p 0.9 (the default) instead of the most likely code.

Each variant runs ``--repeats`` times after one warm-up; the table shows the median seconds, codes per second and the
ratio to unguided.

    python benchmarks/image_guidance.py
    python benchmarks/image_guidance.py --width 512 --layers 8 --image-size 128
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64, help="VQ input size in px (codes: (size / 4)^2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from PIL import Image

    from medtune.models.generation import GenerationSettings, Generator, ImageSampling
    from medtune.models.presets import tiny_chameleon
    from medtune.models.vqgan import ChameleonVQGANDecoder, ChameleonVQGANDecoderConfig

    torch.set_num_threads(args.threads)
    vlm = tiny_chameleon(width=args.width, layers=args.layers, image_size=args.image_size)
    torch.manual_seed(0)
    vlm.attach_decoder(ChameleonVQGANDecoder(ChameleonVQGANDecoderConfig.from_transformers(vlm.model.config)))
    generator, codes = Generator(vlm), vlm.image_tokenizer.codes_per_image
    text = [{"type": "text", "text": "Draw the same chest X-ray with a small effusion on the left."}]
    picture = Image.new("RGB", (args.image_size, args.image_size), (90, 90, 90))
    variants = [("unguided (scales 1, 1)", [], ImageSampling(guidance_text=1, guidance_image=1, temperature=0)),
                ("guided (3.0, 1.2)", [], ImageSampling(temperature=0)),
                ("guided, prompt with an image", [picture], ImageSampling(temperature=0)),
                ("guided, sampled (0.7, top-p 0.9)", [], ImageSampling())]
    rows = []
    for name, images, sampling in variants:
        content = ([{"type": "image"}] if images else []) + text
        settings = GenerationSettings(max_new_tokens=codes + 4, modalities=("image",), image=sampling, seed=0)

        def answer():
            started = time.perf_counter()
            completion = generator.complete([[{"role": "user", "content": content}]], [images], settings)[0]
            assert len(completion.images) == 1, "no image in the answer"
            return time.perf_counter() - started

        answer()   # warm-up
        rows.append((name, statistics.median(answer() for _ in range(args.repeats))))
    base = rows[0][1]
    print(f"Chameleon width {args.width}, {args.layers} layers, {codes} codes per image, {args.threads} threads; "
          f"median of {args.repeats}")
    print(f"| variant | seconds | codes/s | vs unguided |\n| --- | ---: | ---: | ---: |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {codes / seconds:.0f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
