"""An actor's read stage against a real S3 server behind added latency: images per second at 0 to 100 ms.

Starts SeaweedFS on 127.0.0.1 (as the tests do), uploads JPEGs of about 640x480, then, for each added
delay, puts a TCP proxy in front of it that holds every request back by that long (as a distant object
store's round trip would) and times ``ImageLoader``, the code a segmentation actor runs before its
model: fetch, format and size check, EXIF orientation, JPEG left encoded for the device's decoder.
Usage: python bench/storage.py [--images 2000] [--delays 0,20,50,100] [--prefetch 64] [--io-threads 4]
"""

from __future__ import annotations

import argparse
import io
import pathlib
import sys
import tempfile
import time

import numpy as np
import s3fs
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: the S3 server and proxy

from batchseg.io.images import EncodedJpeg
from batchseg.io.loader import ImageLoader
from tests.latency import LatencyProxy
from tests.s3server import running_s3


def photo_like_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """JPEGs of 640x480 with smooth colour fields and edges, about the size of COCO's photos (60-160 kB)."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((640, 480), Image.BICUBIC)
        noise = rng.normal(0, 12, size=(480, 640, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        jpegs.append(buffer.getvalue())
    return jpegs


def read_rate(loader: ImageLoader, uris: list[str]) -> tuple[float, float]:
    """Images per second, and this process's CPU seconds per image."""
    start, cpu = time.perf_counter(), time.process_time()
    loaded = list(loader(uris))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    bad = [x for x in loaded if not isinstance(x, EncodedJpeg)]
    assert not bad, f"{len(bad)} images did not load: {bad[:3]}"
    return len(uris) / seconds, cpu / len(uris)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--delays", default="0,20,50,100", help="added delay per request, in ms")
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--io-threads", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, running_s3(pathlib.Path(tmp), ("images",)) as server:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.options())
        distinct = photo_like_jpegs(50)
        objects = {f"images/{i:06d}.jpg": distinct[i % len(distinct)] for i in range(args.images)}
        fs.pipe(objects)
        kb = sum(len(v) for v in objects.values()) / len(objects) / 1000
        print(f"{args.images} JPEGs of 640x480 ({kb:.0f} kB on average) in SeaweedFS", flush=True)
        uris = [f"s3://{key}" for key in objects]
        rates = {}
        for delay in (int(d) for d in args.delays.split(",")):
            with LatencyProxy(server.ports[3], delay / 1000) as proxy:
                options = server.options() | {"endpoint_url": proxy.endpoint}
                loader = ImageLoader(
                    options, prefetch=args.prefetch, threads=args.io_threads, keep_jpegs=True
                )
                read_rate(loader, uris[: 2 * args.prefetch])  # warm-up: connections, credentials
                rates[delay], cpu = read_rate(loader, uris)
                print(
                    f"added {delay:3d} ms per request: {rates[delay]:7.1f} img/s "
                    f"({rates[delay] / rates[min(rates)]:.2f} of {min(rates)} ms), "
                    f"{cpu * 1e6:.0f} us of CPU per image in this process",
                    flush=True,
                )
    if 0 in rates and 50 in rates:
        print(f"goal: at 50 ms, at least 0.90 of the 0 ms rate: {rates[50] / rates[0]:.2f}")
        print(f"goal: at least 500 img/s per actor at 50 ms: {rates[50]:.0f} img/s")
    print(
        f"one ImageLoader (one actor's read stage): --prefetch {args.prefetch}, --io-threads {args.io_threads}"
    )


if __name__ == "__main__":
    main()
