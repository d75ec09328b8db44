"""Does MGD beat the student trained alone? Paired by seed, on a low-data digits split.

For every seed: the real `teacher` and `distill` stages (same code as `python -m pipeline run`)
train a ResNet-34 teacher, then ResNet-18 students with equal epochs: baseline (task loss
alone), KD, MGD and MGD+KD, all from the same initial weights and data order. Only a share of
the digits is used for training (default 15%); the rest is held out and is the evaluation set,
used for reporting only (nothing is tuned on it). Prints top-1 per seed, mean ± std per
method, and the paired gain over the baseline (mean ± std of the per-seed differences).

    python benchmarks/mgd_gain.py                                  # 5 seeds, paper alpha 7e-5
    python benchmarks/mgd_gain.py --alpha 7e-5 3.4e-3 --seeds 0 1 2   # several alphas, one teacher per seed
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from pipeline import config
from pipeline.runner import Runner, RunOptions
from pipeline.ui import console, setup_logging

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("none", "kd", "mgd", "mgd+kd")


def _stats(xs: list[float]) -> str:
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs) * 100:6.2f} ± {std * 100:4.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "pipeline.toml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--train-share", type=float, default=0.15, help="share of the digits used for training")
    ap.add_argument("--teacher-epochs", type=int, default=60)
    ap.add_argument("--teacher-optimizer", choices=["sgd", "adamw"], default=None, help="default: the config's")
    ap.add_argument("--teacher-lr", type=float, default=None, help="default: the config's")
    ap.add_argument("--student-epochs", type=int, default=30)
    ap.add_argument("--alpha", type=float, nargs="+", default=[7e-5], help="MGD alpha(s); each runs mgd and mgd+kd")
    ap.add_argument("--mask", choices=["channel", "pixel"], default="channel")
    ap.add_argument("--mask-ratio", type=float, default=0.15)
    ap.add_argument("--layers", nargs="+", default=["layer4"], help="tap layers (same names in teacher and student)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--small-input", choices=["auto", "on", "off"], default=None)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = ap.parse_args()
    setup_logging()
    logging.getLogger().setLevel(logging.WARNING)
    base = config.load(args.config)
    runs = [(m, a) for m in args.methods for a in (args.alpha if m.startswith("mgd") else [None])]
    label = {r: (r[0] if r[1] is None else f"{r[0]} α={r[1]:g}") for r in runs}
    acc: dict[str, dict[int, float]] = {label[r]: {} for r in runs}
    teacher_acc: dict[int, float] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method, alpha in runs:
                name = label[(method, alpha)]
                raw = base.model_dump(mode="json")
                raw["pipeline"].update(workdir=f"{tmp}/seed{seed}", seed=seed, device="cpu")
                raw["data"].update(val_fraction=1 - args.train_share, train_fraction=1.0)
                if args.image_size:
                    raw["data"]["image_size"] = args.image_size
                raw["teacher"]["epochs"] = args.teacher_epochs
                if args.teacher_optimizer:
                    raw["teacher"]["optimizer"] = args.teacher_optimizer
                if args.teacher_lr:
                    raw["teacher"]["lr"] = args.teacher_lr
                raw["distill"].update(epochs=args.student_epochs, method=method, baseline=False)
                raw["distill"]["mgd"].update(alpha=alpha or args.alpha[0], mask=args.mask, mask_ratio=args.mask_ratio,
                                            teacher_layers=args.layers, student_layers=args.layers)
                if args.small_input:
                    raw["teacher"]["small_input"] = raw["distill"]["small_input"] = args.small_input
                cfg = config.from_dict(raw, base_dir=base.resolve("."))
                t0 = time.perf_counter()
                out = Runner(cfg, RunOptions(until_stage="distill")).run()  # the teacher is cached per seed
                if out.code not in (0, 3):
                    raise SystemExit(f"seed {seed} {method}: run failed: {out.messages}")
                teacher_acc[seed] = out.manifest.stages["teacher"].metrics["teacher"]["accuracy"]
                acc[name][seed] = out.manifest.stages["distill"].metrics["student"]["accuracy"]
                console.print(f"seed {seed} {name:16s}: {acc[name][seed]:.4f} (teacher {teacher_acc[seed]:.4f}, "
                              f"{time.perf_counter() - t0:.0f}s)")
    d = base.model_dump(mode="json")
    size = args.image_size or d["data"]["image_size"]
    print(f"\n{d['teacher']['arch']} -> {d['distill']['student']}, digits {size}px, train share {args.train_share} "
          f"({int(round(1797 * args.train_share))} images), eval on the other {1 - args.train_share:.0%}; "
          f"teacher {args.teacher_epochs} ep ({d['teacher']['optimizer'] if not args.teacher_optimizer else args.teacher_optimizer} "
          f"lr {args.teacher_lr or d['teacher']['lr']}), students {args.student_epochs} ep ({d['distill']['optimizer']} "
          f"lr {d['distill']['lr']}); "
          f"mask {args.mask} {args.mask_ratio}, layers {args.layers}; seeds {args.seeds}; "
          f"{(time.perf_counter() - t_start) / 60:.1f} min")
    print(f"{'method':16s} {'top-1 % per seed':40s} {'mean ± std':>14s} {'paired gain vs baseline (pt)':>30s}")
    seeds = args.seeds
    print(f"{'teacher':16s} {' '.join(f'{teacher_acc[s] * 100:6.2f}' for s in seeds):40s} {_stats([teacher_acc[s] for s in seeds]):>14s}")
    for m in acc:
        per = " ".join(f"{acc[m][s] * 100:6.2f}" for s in seeds)
        gain = ""
        if m != "none" and "none" in acc:
            diffs = [acc[m][s] - acc["none"][s] for s in seeds]
            gain = _stats(diffs) + f"  ({sum(x > 0 for x in diffs)}/{len(diffs)} seeds up)"
        print(f"{m if m != 'none' else 'baseline':16s} {per:40s} {_stats([acc[m][s] for s in seeds]):>14s} {gain:>30s}")


if __name__ == "__main__":
    main()
