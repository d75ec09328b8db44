"""How many images per second does the training loader deliver from an ImageFolder of JPEGs?

Writes N synthetic JPEGs (4 classes, `--source-size` px squares of smooth colour plus noise, a
stand-in for photos) into a temporary ImageFolder, then drains the pipeline's own training loader
(`stages.training.loaders`: the imagefolder training transform at `--image-size`, RandomResizedCrop
+ flip + normalise, seeded shuffling, the batch size, workers restarted each pass as each epoch)
with `[data] num_workers = 0` and with the default `"auto"`, and prints images/s per pass, the median over the passes and
the ratio. Nothing trains: this is the rate at which decoding and augmentation can feed a model,
the ceiling a GPU step sees. On a CPU-only machine the model competes for the same cores.
With 0 workers the transforms run in the training process, on its torch threads (all cores by
default): on a loaded machine its per-image tensor ops (ToTensor, Normalize) can wait on busy
threads; `--threads 1` shows the single-threaded rate.

    python benchmarks/loader_throughput.py
    python benchmarks/loader_throughput.py --images 1024 --passes 5 --workers 0 2 auto --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import from_dict
from pipeline.data import available_cpus
from pipeline.tasks.classification.data import load_data
from pipeline.stage import StageContext
from stages.training import loaders

CLASSES = ("a", "b", "c", "d")


def write_folder(root: Path, images: int, size: int, seed: int = 0) -> Path:
    """An ImageFolder tree `root/{train,val}/<class>/*.jpg` with `images` training JPEGs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for split, n in (("train", images), ("val", len(CLASSES))):
        for i in range(n):
            c = CLASSES[i % len(CLASSES)]
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            a, b, phase = rng.uniform(1, 6, 3)
            base = np.stack([np.sin(a * xx + phase), np.cos(b * yy), np.sin(a * xx * yy + b)], -1)
            arr = 127 + 100 * base + rng.normal(0, 12, (size, size, 3))
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def one_pass(loader: torch.utils.data.DataLoader) -> tuple[float, int]:
    """Seconds to drain the loader once, and the images it delivered."""
    t0, n = time.perf_counter(), 0
    for images, _ in loader:
        n += images.shape[0]
    return time.perf_counter() - t0, n


def measure(root: Path, workers: int | str, args: argparse.Namespace) -> tuple[int, list[float]]:
    """(resolved worker count, images/s of each pass) for `[data] num_workers = workers`."""
    cfg = from_dict({"data": {"source": "imagefolder", "root": str(root), "image_size": args.image_size,
                              "batch_size": args.batch_size, "num_workers": workers},
                     "pipeline": {"workdir": str(root / "run"), "device": args.device}}, root)
    ctx = StageContext(cfg=cfg, name="teacher", workdir=root, inputs={}, device=torch.device(args.device), key="bench",
                       _data=load_data(cfg.data, seed=0, base_dir=root))
    train, _ = loaders(ctx)
    rates = []
    for _ in range(args.passes):
        seconds, n = one_pass(train)
        rates.append(n / seconds)
    return train.num_workers, rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512, help="training JPEGs to write")
    ap.add_argument("--source-size", type=int, default=224, help="side of the JPEGs on disk (px)")
    ap.add_argument("--image-size", type=int, default=224, help="[data] image_size: the model's input")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--passes", type=int, default=3, help="passes over the images per setting (median reported)")
    ap.add_argument("--workers", nargs="+", default=["0", "auto"], help="num_workers settings to compare")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (cuda pins the batches' memory, as training does)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of this (the training) process; 0: torch's default, as a run has")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.images} JPEGs of {args.source_size} px, image_size {args.image_size}, batch {args.batch_size}, "
          f"{args.passes} passes each; {available_cpus()} CPUs available to this process, "
          f"{torch.get_num_threads()} torch threads in it")
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp), args.images, args.source_size)
        results = {}
        for setting in args.workers:
            value = setting if setting == "auto" else int(setting)
            workers, rates = measure(root, value, args)
            results[setting] = statistics.median(rates)
            passes = ", ".join(f"{r:.0f}" for r in rates)
            print(f"num_workers = {setting!r:7s} -> {workers} worker(s): median {results[setting]:7.0f} images/s "
                  f"(passes: {passes})")
    first = args.workers[0]
    for setting in args.workers[1:]:
        print(f"{setting!r} vs {first!r}: {results[setting] / results[first]:.2f}x")


if __name__ == "__main__":
    main()
