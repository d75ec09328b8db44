"""A new user's first runs: their own data, a common model pair, and no recipe keys at all.

Writes three datasets nobody on the project tuned for, in the formats users bring, then runs
`python -m pipeline run` on each with a config that names only the data, the task and the
models (no optimizer, lr, batch size, epochs of the students, MGD α, taps or resampling), and
prints what each stage gave:

1. classification, ResNet-18 → MobileNetV3-Small, an ImageFolder of 20-px grayscale PNGs of
   five shape classes;
2. segmentation, DeepLabV3-ResNet34 → LRASPP-MobileNetV3-Large, a mask-PNG folder at 64 px,
   three shape classes + background;
3. detection, FCOS-ResNet34 → FCOS-ResNet18, a COCO-JSON set of 200 training images of simple
   shapes (96 px canvases of varying size, non-contiguous category ids), 8 teacher epochs.

    python benchmarks/user_cases.py                 # all three (about 30 min on 2 CPU cores)
    python benchmarks/user_cases.py --cases 3       # only detection
    python benchmarks/user_cases.py --workdir /tmp/u # keep the data and run directories

The shapes are drawn with a seeded generator (filled circles, squares, triangles, crosses and
rings of random size, position and grey level on a noisy background), so every run sees the
same images.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("circle", "square", "triangle", "cross", "ring")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        w = max(1.0, r / 2.5)
        draw.rectangle((cx - w, y0, cx + w, y1), fill=fill)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=fill)
    else:  # ring
        draw.ellipse(box, outline=fill, width=max(1, int(r / 2.5)))


def _background(rng: np.random.Generator, h: int, w: int, channels: int) -> np.ndarray:
    base = rng.uniform(0, 80)
    noise = rng.normal(0, 12, size=(h, w, channels))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_imagefolder(root: Path, *, seed: int = 0, per_class: tuple[int, int] = (120, 40), size: int = 20) -> None:
    """root/{train,val}/<shape>/*.png: one grayscale shape per image, five classes."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), per_class):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = Image.fromarray(_background(rng, size, size, 1)[..., 0], mode="L")
                side = rng.uniform(0.45, 0.9) * size
                x0, y0 = rng.uniform(0, size - side, 2)
                _draw(ImageDraw.Draw(img), shape, (x0, y0, x0 + side, y0 + side), int(rng.uniform(150, 255)))
                img.save(folder / f"{i:04d}.png")


def write_masks(root: Path, *, seed: int = 1, counts: tuple[int, int] = (300, 80), size: int = 64) -> None:
    """root/{train,val}/{images,masks}: RGB images with 1-3 shapes, masks with class = 1 + shape
    index (circle, square, triangle), 0 background."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), counts):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = Image.fromarray(_background(rng, size, size, 3))
            mask = Image.new("L", (size, size), 0)
            for _ in range(int(rng.integers(1, 4))):
                k = int(rng.integers(0, 3))
                side = rng.uniform(0.2, 0.5) * size
                x0, y0 = rng.uniform(0, size - side, 2)
                box = (x0, y0, x0 + side, y0 + side)
                colour = tuple(int(c) for c in rng.uniform(120, 255, 3))
                _draw(ImageDraw.Draw(img), SHAPES[k], box, colour)
                _draw(ImageDraw.Draw(mask), SHAPES[k], box, k + 1)
            img.save(root / split / "images" / f"{i:04d}.png")
            mask.save(root / split / "masks" / f"{i:04d}.png")


CATEGORY_IDS = (3, 7, 12)  # non-contiguous, as in COCO


def write_coco(root: Path, *, seed: int = 2, counts: tuple[int, int] = (200, 60)) -> None:
    """root/{train,val}/*.jpg and root/{train,val}.json: COCO instances, 1-3 shapes an image
    (circle, square, triangle as categories 3, 7, 12), canvases of 80-112 px per side."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), counts):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            w, h = (int(v) for v in rng.integers(80, 113, 2))
            img = Image.fromarray(_background(rng, h, w, 3))
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(1, 4))):
                k = int(rng.integers(0, 3))
                side = rng.uniform(0.2, 0.45) * min(w, h)
                x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
                _draw(draw, SHAPES[k], (x0, y0, x0 + side, y0 + side), tuple(int(c) for c in rng.uniform(120, 255, 3)))
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": CATEGORY_IDS[k],
                                    "bbox": [round(x0, 2), round(y0, 2), round(side, 2), round(side, 2)],
                                    "area": round(side * side, 2), "iscrowd": 0})
            img.save(folder / f"{i:04d}.jpg", quality=95)
            images.append({"id": i + 1, "file_name": f"{i:04d}.jpg", "width": w, "height": h})
        cats = [{"id": c, "name": s} for c, s in zip(CATEGORY_IDS, SHAPES)]
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                        "categories": cats}))


CONFIGS = {
    1: ("classification: resnet18 -> mobilenet_v3_small, ImageFolder 20 px", "shapes-folder", write_imagefolder, """
[data]
source = "imagefolder"
root = "shapes-folder"
image_size = 20
[teacher]
arch = "resnet18"
[distill]
student = "mobilenet_v3_small"
[distill.mgd]
mask = "channel"
"""),
    2: ("segmentation: deeplabv3_resnet34 -> lraspp_mobilenet_v3_large, masks 64 px", "shapes-masks", write_masks, """
[pipeline]
task = "segmentation"
[data]
source = "masks"
root = "shapes-masks"
num_classes = 4
image_size = 64
[teacher]
arch = "deeplabv3_resnet34"
[distill]
student = "lraspp_mobilenet_v3_large"
"""),
    3: ("detection: fcos_resnet34_fpn -> fcos_resnet18_fpn, COCO JSON 96 px", "shapes-coco", write_coco, """
[pipeline]
task = "detection"
[data]
source = "coco"
train_images = "shapes-coco/train"
train_annotations = "shapes-coco/train.json"
val_images = "shapes-coco/val"
val_annotations = "shapes-coco/val.json"
image_size = 96
[teacher]
arch = "fcos_resnet34_fpn"
[distill]
student = "fcos_resnet18_fpn"
"""),
}


def _summary(manifest: dict) -> list[str]:
    metric = manifest["pipeline"]["task"]["metric"]  # the task's primary metric, as the manifest records it
    lines = []
    for stage, rec in manifest["stages"].items():
        for art, m in (rec.get("metrics") or {}).items():
            if isinstance(m, dict) and metric in m:
                extra = f", map_50 {m['map_50']:.3f}" if "map_50" in m else ""
                lines.append(f"  {stage:9s} {art:22s} {metric} {m[metric]:.3f}{extra}")
        if rec.get("status") != "ok":
            lines.append(f"  {stage:9s} {rec.get('status')}: {rec.get('reason', '')[:200]}")
        for art, hist in (rec.get("history") or {}).items():
            bad = [e["epoch"] for e in hist if not all(math.isfinite(v) for v in e.values() if isinstance(v, float))]
            if bad:
                lines.append(f"  {stage:9s} {art}: non-finite values at epochs {bad}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, nargs="+", default=[1, 2, 3], choices=sorted(CONFIGS))
    ap.add_argument("--workdir", default=None, help="keep data and runs here (default: a temporary folder)")
    ap.add_argument("--until", default="distill", help="last stage to run (default: distill)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.workdir or tmp)
        base.mkdir(parents=True, exist_ok=True)
        for case in args.cases:
            title, folder, write, body = CONFIGS[case]
            if not (base / folder).exists():
                write(base / folder)
            toml = base / f"case{case}.toml"
            toml.write_text(f'[pipeline]\nname = "case{case}"\nworkdir = "run{case}"\n'
                            + body.replace("[pipeline]\n", ""))
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(toml), "--until", args.until],
                                  cwd=ROOT, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            print(f"case {case}, {title}: exit {proc.returncode} in {seconds / 60:.1f} min")
            manifest = base / f"run{case}" / "manifest.json"
            if manifest.exists():
                print("\n".join(_summary(json.loads(manifest.read_text()))))
            if proc.returncode != 0:
                print("  " + "\n  ".join(proc.stderr.strip().splitlines()[-5:]))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
