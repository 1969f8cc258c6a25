"""Benchmark: `medtune serve` under the hostile requests of issue 28, with the server's peak memory for each.

Starts a real ``medtune serve`` on loopback with a tiny random model (presets.tiny_spec), as the issue's
adversarial run did (``--max-queue 8 --max-batch-size 2``, every other limit at its default), and sends, one case
at a time:

* three 766 KB gzipped NIfTI data URIs at once, each inflating to 788 MB (1024 x 1024 x 376 int16 zeros);
* three deflated DICOM data URIs at once, each inflating to 128 MiB (an 8192 x 8192 16-bit slice);
* one request holding six 7000 x 7000 PNGs (49 Mpx each, a few hundred KB together);
* eight requests at once, each holding one 5000 x 5000 PNG: every one at the per-request budget;
* a 300 MB chunked body (no Content-Length);
* ten clients that each ask for a 900-token answer and hang up, then one more request;
* a prompt of about 100k tokens;
* the malformed bodies that used to be 500s (seed 2**70, a window object, JSON nested 100k deep, an integer of
  10^6 digits), and a million empty JSON objects.

The server's resident memory before each case and its peak during it (VmHWM, reset through
/proc/PID/clear_refs) are printed with the outcome, beside the bound the server's limits give (``stated_bound``;
memory the allocator keeps after a case stays resident and counts in the next one's figures). Exits 1 if a case gets
an unexpected status, the server dies, or a peak passes the bound. Linux only (/proc).

    python benchmarks/serve_bombs.py
    python benchmarks/serve_bombs.py --max-queue 16 --max-request-pixels 50000000
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

from common.serving import free_port, start_medtune_serve

MODEL_ID = "bench"
MIB = 1 << 20
# Decoding holds a few copies of an image at once: 16-bit data goes through float64 (8 bytes a pixel) twice, and
# DICOM adds its own pixel array; 40 bytes a pixel covers the worst (measured here: about 13 for an RGB PNG, the
# image processor's copies included).
DECODE_BYTES_PER_PIXEL = 40


def build_model(out: Path) -> Path:
    from medtune.models import presets
    from medtune.models.build import build_vlm

    build_vlm(presets.tiny_spec()).save(out)
    return out


# -- crafted inputs (streamed through zlib: nothing their inflated size is ever held here) ----------------------


def zeros_deflated(size: int, prefix: bytes = b"", wbits: int = 15) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    out, block = [packer.compress(prefix)], bytes(MIB)
    for start in range(0, size, MIB):
        out.append(packer.compress(block[:min(MIB, size - start)]))
    return b"".join(out) + packer.flush()


def nifti_bomb(shape=(1024, 1024, 376)) -> bytes:
    """A gzipped NIfTI-1 of int16 zeros: 788 MB of voxels in about 766 KB."""
    import nibabel
    import numpy as np

    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_data_offset(352)
    return zeros_deflated(int(np.prod(shape)) * 2, header.binaryblock + bytes(4), wbits=31)


def deflated_dicom_bomb(rows: int = 8192, columns: int = 8192) -> bytes:
    """A deflated DICOM CT slice of 16-bit zeros: 128 MiB of pixel data in about 130 KB, written without ever
    holding the pixels (the dataset, then PixelData's header, then its zeros, through one raw deflate stream)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.Rows, dataset.Columns = "CT", rows, columns
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    pydicom.filewriter.write_file_meta_info(head, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(body, dataset)
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, rows * columns * 2)
    return bytes(128) + b"DICM" + head.getvalue() + zeros_deflated(rows * columns * 2, body.getvalue() + pixel_header,
                                                                   wbits=-15)


def grey_png(width: int, height: int) -> bytes:
    """An RGB PNG of zeros, ``width`` x ``height``, written chunk by chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zeros_deflated((1 + 3 * width) * height)   # each row: filter byte 0, then its pixels
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def ask(*urls: str, text: str = "What does this show?", **settings) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in urls] + [{"type": "text", "text": text}]
    return {"model": MODEL_ID, "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": content}],
            **settings}


# -- the cases: each sends its requests and says what came back ---------------------------------------------------


async def post_all(url: str, bodies: list) -> list:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        return await asyncio.gather(*(client.post(url, content=body if isinstance(body, bytes) else None,
                                                  json=None if isinstance(body, bytes) else body,
                                                  headers={"Content-Type": "application/json"})
                                      for body in bodies))


def outcome_of(responses: list) -> str:
    statuses = sorted(r.status_code for r in responses)
    counts = ", ".join(f"{statuses.count(s)} x {s}" for s in sorted(set(statuses)))
    errors = [r.json()["error"]["message"] for r in responses if r.status_code >= 400 and r.status_code != 503]
    return counts + (f": {errors[0][:220]}" if errors else "")


def case_nifti_bombs(base: str, port: int) -> tuple[str, list]:
    bomb = nifti_bomb()
    body = ask(data_uri(bomb, "image/nifti"))
    responses = asyncio.run(post_all(base + "/v1/chat/completions", [body] * 3))
    return f"({len(bomb) / 1024:.0f} KB each) " + outcome_of(responses), [r.status_code for r in responses]


def case_dicom_bomb(base: str, port: int) -> tuple[str, list]:
    bomb = deflated_dicom_bomb()
    responses = asyncio.run(post_all(base + "/v1/chat/completions", [ask(data_uri(bomb, "application/dicom"))] * 3))
    return f"({len(bomb) / 1024:.0f} KB each) " + outcome_of(responses), [r.status_code for r in responses]


def case_six_large_pngs(base: str, port: int) -> tuple[str, list]:
    png = data_uri(grey_png(7000, 7000), "image/png")
    body = ask(*[png] * 6)
    responses = asyncio.run(post_all(base + "/v1/chat/completions", [body]))
    return f"({len(json.dumps(body)) / 1024:.0f} KB) " + outcome_of(responses), [r.status_code for r in responses]


def case_eight_at_the_budget(base: str, port: int) -> tuple[str, list]:
    body = ask(data_uri(grey_png(5000, 5000), "image/png"))
    responses = asyncio.run(post_all(base + "/v1/chat/completions", [body] * 8))
    return outcome_of(responses), [r.status_code for r in responses]


def case_chunked_body(base: str, port: int, total: int = 300 * MIB) -> tuple[str, list]:
    import select

    sent, block = 0, b" " * MIB
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        answered = b""
        while sent < total and not answered:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
            except OSError:   # the server closed the connection
                break
            if select.select([sock], [], [], 0)[0]:
                answered = sock.recv(65536)
        if not answered:
            answered = sock.recv(65536)
    status = int(answered.split(b" ", 2)[1]) if answered else 0
    return f"{status} after {sent / MIB:.0f} MB sent of {total / MIB:.0f} MB", [status]


def case_hang_ups(base: str, port: int) -> tuple[str, list]:
    import httpx

    body = json.dumps(ask(text="Tell me everything.", max_tokens=900)).encode()
    clients = []
    for _ in range(10):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        clients.append(sock)
    time.sleep(0.5)
    health = httpx.get(base + "/health").json()
    for sock in clients:
        sock.close()
    started = time.monotonic()
    answer = httpx.post(base + "/v1/chat/completions", json=ask(text="Still there?", max_tokens=4), timeout=600)
    busy = f"{health['running']} running + {health['waiting']} waiting"
    return (f"{busy} hung up; the next request: {answer.status_code} in {time.monotonic() - started:.2f} s",
            [answer.status_code])


def case_long_prompt(base: str, port: int) -> tuple[str, list]:
    started = time.monotonic()
    responses = asyncio.run(post_all(base + "/v1/chat/completions", [ask(text="is it normal " * 33_000)]))
    return f"in {time.monotonic() - started:.2f} s: " + outcome_of(responses), [r.status_code for r in responses]


def case_malformed(base: str, port: int) -> tuple[str, list]:
    window = ask()
    window["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": "x", "window": {}}})
    deep = '{"model": "bench", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    digits = '{"model": "bench", "max_tokens": ' + "9" * 10**6 + "}"
    objects = '{"model": "bench", "messages": [' + "{}," * 10**6 + "{}]}"   # 3 MB that parse to about 75 MB
    responses = asyncio.run(post_all(base + "/v1/chat/completions",
                                     [ask(seed=2**70), window, deep.encode(), digits.encode(), objects.encode()]))
    statuses = [r.status_code for r in responses]
    return ", ".join(map(str, statuses)) + " (seed, window, depth, digits, a million {})", statuses


CASES = [  # name, function, the statuses it may get
    ("3 x gzip NIfTI bomb (788 MB inflated)", case_nifti_bombs, {400}),
    ("3 x deflated DICOM bomb (128 MiB inflated)", case_dicom_bomb, {400}),
    ("6 x 49 Mpx PNG in one request", case_six_large_pngs, {400}),
    ("8 x one 25 Mpx PNG at once", case_eight_at_the_budget, {200, 503}),
    ("300 MB chunked body", case_chunked_body, {413}),
    ("10 clients hang up", case_hang_ups, {200}),
    ("~100k-token prompt", case_long_prompt, {400}),
    ("malformed (the old 500s, a million {})", case_malformed, {400}),
]


# -- memory ---------------------------------------------------------------------------------------------------------


def peak_rss(pid: int, *, reset: bool = False) -> int:
    """The process's peak resident set in bytes since the last reset (VmHWM); ``reset`` starts a new peak."""
    if reset:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/PID/status")


def stated_bound(idle: int, max_queue: int, max_body: int, request_pixels: int, decoders: int) -> tuple[int, str]:
    """What the server may hold at once on top of its idle memory: every request with a place in the queue may
    hold its body, and each of the ``decoders`` requests being decoded also its parsed JSON (its strings, under
    its body's size, and up to MAX_JSON_VALUES small values of ~80 bytes), its base64-decoded bytes and its
    images' working copies."""
    from medtune.serve.api import MAX_JSON_VALUES

    json_values = 80 * MAX_JSON_VALUES
    extra = max_queue * max_body + decoders * (2 * max_body + json_values + DECODE_BYTES_PER_PIXEL * request_pixels)
    how = (f"idle {idle / MIB:.0f} MB + {max_queue} queue places x {max_body / MIB:.0f} MB body + {decoders} "
           f"decoders x (2 x {max_body / MIB:.0f} MB + {json_values / MIB:.0f} MB of JSON values + "
           f"{DECODE_BYTES_PER_PIXEL} B x {request_pixels:,} px)")
    return idle + extra, how


def main(argv: list[str] | None = None) -> int:
    from medtune.serve.api import DECODERS, DEFAULT_MAX_REQUEST_PIXELS, ServerConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=2)
    parser.add_argument("--max-request-pixels", type=int, default=DEFAULT_MAX_REQUEST_PIXELS)
    args = parser.parse_args(argv)
    import httpx

    max_body = ServerConfig(model_id=MODEL_ID).max_body_bytes
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "tiny-vlm")
        port = free_port()
        server = start_medtune_serve(model, port, MODEL_ID, "--max-queue", str(args.max_queue), "--max-batch-size",
                                     str(args.max_batch_size), "--max-request-pixels", str(args.max_request_pixels))
        base = f"http://127.0.0.1:{port}"
        try:
            httpx.post(base + "/v1/chat/completions", json=ask(data_uri(grey_png(64, 64), "image/png")), timeout=600)
            idle = peak_rss(server.pid, reset=True)
            bound, how = stated_bound(idle, args.max_queue, max_body, args.max_request_pixels, DECODERS)
            for name, case, expected in CASES:
                before = peak_rss(server.pid, reset=True)   # what earlier cases left resident counts here too
                outcome, statuses = case(base, port)
                time.sleep(0.5)   # let the server finish what the case left (a hung-up generation, a late decode)
                peak = peak_rss(server.pid)
                ok = set(statuses) <= expected and peak <= bound and server.poll() is None
                failed += not ok
                rows.append((name, before, peak, outcome if ok else f"UNEXPECTED: {outcome}"))
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"medtune serve, tiny preset, --max-queue {args.max_queue}, --max-batch-size {args.max_batch_size}, "
          f"--max-request-pixels {args.max_request_pixels:,}, other limits at their defaults (body {max_body:,} "
          f"bytes); {os.cpu_count()} CPUs")
    print(f"stated bound on peak RSS: {bound / MIB:,.0f} MB = {how}\n")
    print("| case | RSS before MB | peak RSS MB | outcome |\n| --- | ---: | ---: | --- |")
    for name, before, peak, outcome in rows:
        print(f"| {name} | {before / MIB:,.0f} | {peak / MIB:,.0f} | {outcome} |")
    if failed:
        print(f"FAILED: {failed} cases got an unexpected status, passed the bound or stopped the server",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
