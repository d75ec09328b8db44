"""Is the default teacher recipe robust? Train the demo teacher with a few recipes and seeds.

Runs the real `teacher` stage (same code path as `python -m pipeline run`) on the demo config
for every (recipe, seed) pair and prints the val accuracy per seed, mean ± std and worst seed.
A teacher trained from scratch on little data can collapse (seen on the digits); distillation needs a
teacher that reliably beats the student, so the default must hold on every seed, not on average.

    python benchmarks/teacher_recipe.py                      # demo config, 3 seeds, 3 recipes
    python benchmarks/teacher_recipe.py --seeds 0 1 --train-fraction 0.15
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pipeline import config
from pipeline.runner import Runner, RunOptions
from pipeline.ui import console, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "sgd lr 0.05": {"optimizer": "sgd", "lr": 0.05},
    "sgd lr 0.02 (default)": {"optimizer": "sgd", "lr": 0.02},
    "adamw lr 2e-3": {"optimizer": "adamw", "lr": 0.002},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "pipeline.toml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-fraction", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=None, help="override teacher.epochs")
    args = ap.parse_args()
    setup_logging()
    import logging

    logging.getLogger().setLevel(logging.WARNING)  # the table is the output
    base = config.load(args.config)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in RECIPES.items():
            for seed in args.seeds:
                raw = base.model_dump(mode="json")
                raw["pipeline"].update(workdir=f"{tmp}/{len(results)}-{seed}", seed=seed)
                raw["data"]["train_fraction"] = args.train_fraction
                raw["teacher"].update(recipe)
                if args.epochs is not None:
                    raw["teacher"]["epochs"] = args.epochs
                cfg = config.from_dict(raw, base_dir=base.resolve("."))
                t0 = time.perf_counter()
                out = Runner(cfg, RunOptions(until_stage="teacher")).run()
                acc = out.manifest.stages["teacher"].metrics["teacher"]["accuracy"]
                results.setdefault(name, []).append(acc)
                console.print(f"{name:24s} seed {seed}: {acc:.4f} ({time.perf_counter() - t0:.0f}s)")
    print(f"\nteacher {base.teacher.arch}, {base.teacher.epochs if args.epochs is None else args.epochs} epochs, "
          f"digits {base.data.image_size}px, train_fraction {args.train_fraction}, seeds {args.seeds}")
    print(f"{'recipe':24s} {'per seed':32s} {'mean ± std':16s} worst")
    for name, accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per = " ".join(f"{a:.3f}" for a in accs)
        print(f"{name:24s} {per:32s} {statistics.mean(accs):.4f} ± {std:.4f}  {min(accs):.4f}")


if __name__ == "__main__":
    main()
