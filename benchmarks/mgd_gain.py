"""Does MGD beat the student trained alone? Paired by seed, for any task.

For every seed: the real `teacher` and `distill` stages (the same code as `python -m pipeline
run`) train the teacher, then students with equal epochs from the same initial weights and data
order: baseline (task loss alone) and each distillation method. The evaluation split is used
for reporting only (nothing is tuned on it). Prints the task's primary metric (top-1 accuracy,
mIoU, mAP) per seed, mean ± std per method, and the paired gain over the baseline (mean ± std
of the per-seed differences, and how many seeds went up).

    python benchmarks/mgd_gain.py                                  # classification: pipeline.toml as written, 5 seeds
    python benchmarks/mgd_gain.py --task segmentation              # configs/scenes-segmentation.toml, 3 seeds
    python benchmarks/mgd_gain.py --task detection                 # configs/scenes-detection.toml, 3 seeds
    python benchmarks/mgd_gain.py --task instance_segmentation     # configs/scenes-instance.toml, 3 seeds
    python benchmarks/mgd_gain.py --alpha 7e-5 3.43e-3 --seeds 0 1 2   # several alphas, one teacher per seed
    python benchmarks/mgd_gain.py --unlabeled rest --dev 0.2 --seeds 0 1 2   # with the unlabelled stream ('+u'), on a development split
    python benchmarks/mgd_gain.py --config configs/digits.toml --train-share 0.15 --teacher-epochs 60 \
        --student-epochs 30 --alpha 7e-5 3.43e-3 --methods none kd mgd mgd+kd   # the earlier low-data digits table
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipeline import config, gain_records
from pipeline.runner import Runner, RunOptions
from pipeline.tasks import task_for
from pipeline.ui import console, setup_logging

ROOT = Path(__file__).resolve().parents[1]
# "mgd+init": MGD with `init_student` (the student starts from the teacher's neck and head); for a
# task that has `init_student`, the other methods run without it.
# "+u": the same method with the unlabelled stream (`[distill] unlabeled`, from --unlabeled).
METHODS = ("none", "kd", "mgd", "mgd+kd", "mgd+init", "kd+u", "mgd+u", "mgd+kd+u", "mgd+init+u")
# Per task: the config, the methods compared and the seeds, unless given on the command line.
DEFAULTS = {
    "classification": (ROOT / "pipeline.toml", ("none", "mgd"), [0, 1, 2, 3, 4]),
    "segmentation": (ROOT / "configs" / "scenes-segmentation.toml", ("none", "mgd", "mgd+kd"), [0, 1, 2]),
    "detection": (ROOT / "configs" / "scenes-detection.toml", ("none", "mgd", "mgd+init"), [0, 1, 2]),
    "instance_segmentation": (ROOT / "configs" / "scenes-instance.toml", ("none", "mgd", "mgd+init", "mgd+init+u"),
                              [0, 1, 2]),
}


def _stats(xs: list[float]) -> str:
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs) * 100:6.2f} ± {std * 100:4.2f}"


def _detectable(se: float, n: int) -> float:
    """The smallest paired gain this many seeds detect: two-sided 5% test at 80% power,
    (t₀.₉₇₅ + t₀.₈₀) × SE with n − 1 degrees of freedom."""
    if n < 2:
        return float("nan")
    from scipy import stats

    return (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.80, n - 1)) * se


def _alpha(text: str) -> float | str:
    return text if text == "auto" else float(text)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(DEFAULTS), default="classification")
    ap.add_argument("--config", default=None, help="default: the task's (see DEFAULTS)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--device", default="cpu", help="pipeline.device for every run (auto: CUDA when present)")
    ap.add_argument("--train-share", type=float, default=None, help="digits: share used for training (everyone)")
    ap.add_argument("--student-share", type=float, default=None,
                    help="distill.train_fraction: share of the training split the students get (default: the config's)")
    ap.add_argument("--teacher-epochs", type=int, default=None)
    ap.add_argument("--teacher-optimizer", choices=["sgd", "adamw"], default=None, help="default: the config's")
    ap.add_argument("--teacher-lr", type=float, default=None, help="default: the config's")
    ap.add_argument("--student-epochs", type=int, default=None)
    ap.add_argument("--student-lr", type=float, default=None, help="default: the config's")
    ap.add_argument("--alpha", type=_alpha, nargs="+", default=None,
                    help="MGD alpha(s), a number or \"auto\"; each runs the MGD methods")
    ap.add_argument("--mask", choices=["channel", "pixel"], default=None)
    ap.add_argument("--mask-ratio", type=float, default=None)
    ap.add_argument("--layers", nargs="+", default=None, help="tap layers (same names in teacher and student)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--train-images", type=int, default=None, help="scenes: training scenes")
    ap.add_argument("--small-input", choices=["auto", "on", "off"], default=None)
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    ap.add_argument("--unlabeled", default=None,
                    help="[distill] unlabeled for the '+u' methods (\"rest\" or a folder; default: the config's); "
                         "with one and no --methods: none, kd, mgd, mgd+kd with and without the stream")
    ap.add_argument("--dev", type=float, default=None,
                    help="data.dev_fraction: evaluate on this share of the training split (a development split), "
                         "never on the evaluation images")
    ap.add_argument("--workdir", default=None,
                    help="keep the runs here (default: a temporary folder); a later call with the same settings "
                         "and seeds re-uses the trained teachers and the students already scored (scores.json)")
    ap.add_argument("--record", default=None,
                    help="write the table as a JSON record here (benchmarks/results/NAME.json: the report of a run "
                         "with the same setting shows it beside the run's own gain)")
    args = ap.parse_args()
    path, methods, seeds = DEFAULTS[args.task]
    args.config = args.config or str(path)
    if args.unlabeled is None:  # the config's own stream, if it has one
        args.unlabeled = config.load(args.config).distill.unlabeled or None
    if args.unlabeled and not args.methods and not any(m.endswith("+u") for m in methods):
        methods = ("none", "kd", "mgd", "mgd+kd", "kd+u", "mgd+u", "mgd+kd+u")
    args.methods = args.methods or list(methods)
    if any(m.endswith("+u") for m in args.methods) and not args.unlabeled:
        ap.error("the '+u' methods need --unlabeled (or a config with [distill] unlabeled)")
    args.seeds = args.seeds or seeds
    return args


def _config(base: config.Config, args: argparse.Namespace, tmp: str, seed: int, method: str, alpha: float | None):
    raw = base.model_dump(mode="json")
    raw["pipeline"].update(workdir=f"{tmp}/seed{seed}", seed=seed, device=args.device)
    if args.train_share is not None:
        raw["data"].update(val_fraction=1 - args.train_share, train_fraction=1.0)
    if args.image_size:
        raw["data"]["image_size"] = args.image_size
    if args.train_images:
        raw["data"]["scenes"]["train_images"] = args.train_images
    for table, key, value in (("teacher", "epochs", args.teacher_epochs), ("teacher", "optimizer", args.teacher_optimizer),
                              ("teacher", "lr", args.teacher_lr), ("distill", "epochs", args.student_epochs),
                              ("distill", "train_fraction", args.student_share),
                              ("distill", "lr", args.student_lr)):
        if value is not None:
            raw[table][key] = value
    stream = method.endswith("+u")
    method = method.removesuffix("+u")
    raw["distill"].update(method=method.removesuffix("+init"), baseline=False,
                          unlabeled=args.unlabeled if stream else "")
    if args.dev is not None:
        raw["data"]["dev_fraction"] = args.dev
    if task_for(base).init_student_prefixes:
        raw["distill"]["init_student"] = method.endswith("+init")
    mgd = raw["distill"]["mgd"]
    for key, value in (("alpha", alpha), ("mask", args.mask), ("mask_ratio", args.mask_ratio),
                       ("teacher_layers", args.layers), ("student_layers", args.layers)):
        if value is not None:
            mgd[key] = value
    if args.small_input:
        raw["teacher"]["small_input"] = raw["distill"]["small_input"] = args.small_input
    return config.from_dict(raw, base_dir=base.resolve("."))


def main() -> None:
    args = _args()
    setup_logging()
    logging.getLogger().setLevel(logging.WARNING)
    base = config.load(args.config)
    metric = task_for(base).metric
    alphas = args.alpha or [None]
    runs = [(m, a) for m in args.methods for a in (alphas if m.startswith("mgd") else [None])]
    label = {r: (r[0] if r[1] is None else f"{r[0]} α={r[1]}") for r in runs}
    score: dict[str, dict[int, float]] = {label[r]: {} for r in runs}
    teacher: dict[int, float] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() if args.workdir is None else contextlib.nullcontext(args.workdir) as tmp:
        done = _Scores(Path(tmp) / "scores.json")
        for seed in args.seeds:
            for method, alpha in runs:
                name = label[(method, alpha)]
                cfg = _config(base, args, tmp, seed, method, alpha)
                key = _key(cfg, name, seed)
                t0 = time.perf_counter()
                if key in done:  # scored by an earlier call on the same setting
                    teacher[seed], score[name][seed] = done[key]
                else:
                    out = Runner(cfg, RunOptions(until_stage="distill")).run()  # the teacher is cached per seed
                    if out.code not in (0, 3):
                        raise SystemExit(f"seed {seed} {method}: run failed: {out.messages}")
                    teacher[seed] = out.manifest.stages["teacher"].metrics["teacher"][metric]
                    score[name][seed] = out.manifest.stages["distill"].metrics["student"][metric]
                    done[key] = (teacher[seed], score[name][seed])
                console.print(f"seed {seed} {name:16s}: {metric} {score[name][seed]:.4f} (teacher {teacher[seed]:.4f}, "
                              f"{time.perf_counter() - t0:.0f}s)")
    d = cfg.model_dump(mode="json")
    data = d["data"]
    what = f"{data['source']} {data['image_size']}px"
    if args.train_share is not None:
        what += f", train share {args.train_share}"
    if d["distill"]["train_fraction"] < 1:
        what += f", students train on {d['distill']['train_fraction']:g} of it"
    if any(m.endswith("+u") for m in args.methods):
        what += f", '+u': distilling on unlabeled = {args.unlabeled!r} too"
    what += f", evaluated on {'a development split of ' + str(args.dev) + ' of train' if args.dev else 'val'}"
    print(f"\n{d['teacher']['arch']} -> {d['distill']['student']} ({base.pipeline.task}, {what}); "
          f"teacher {d['teacher']['epochs']} ep ({d['teacher']['optimizer']} lr {d['teacher']['lr']}), "
          f"students {d['distill']['epochs']} ep ({d['distill']['optimizer']} lr {d['distill']['lr']}); "
          f"MGD α {d['distill']['mgd']['alpha']} λ {d['distill']['mgd']['mask_ratio']} {d['distill']['mgd']['mask']} mask "
          f"on {d['distill']['mgd']['student_layers']}; device {args.device}; seeds {args.seeds}; "
          f"{(time.perf_counter() - t_start) / 60:.1f} min")
    seeds = args.seeds
    rows = _table(teacher, score, seeds)
    print(f"{'method':16s} {f'{metric} % per seed':40s} {'mean ± std':>14s} {'paired gain vs baseline (pt)':>30s}")
    print(f"{'teacher':16s} {' '.join(f'{teacher[s] * 100:6.2f}' for s in seeds):40s} {_stats([teacher[s] for s in seeds]):>14s}")
    for m, row in rows.items():
        per = " ".join(f"{score[m][s] * 100:6.2f}" for s in seeds)
        gain = ""
        if "gain" in row:
            gain = (f"{row['gain'] * 100:6.2f} ± {row['gain_std'] * 100:4.2f} (SE {row['se'] * 100:.2f}; "
                    f"{row['up']}/{len(seeds)} seeds up; detectable ≥ {row['detectable'] * 100:.2f})")
        print(f"{m if m != 'none' else 'baseline':16s} {per:40s} {_stats([score[m][s] for s in seeds]):>14s} {gain:>30s}")
    if "none" in score:
        gap = [teacher[s] - score["none"][s] for s in seeds]
        print(f"teacher ahead of the baseline student by {_stats(gap)} pt ({sum(x > 0 for x in gap)}/{len(gap)} seeds)")
    shares = _shares(score, seeds)
    if shares:
        print("paired, method against method (what MGD or the unlabelled stream adds):")
    for name, d in shares.items():
        print(f"  {name:20s} {d['gain'] * 100:6.2f} ± {d['gain_std'] * 100:4.2f} pt (SE {d['se'] * 100:.2f}; "
              f"{d['up']}/{len(seeds)} seeds up; detectable ≥ {d['detectable'] * 100:.2f})")
    if args.record:
        _record(Path(args.record), base, cfg, args, metric, teacher, score, rows, what, shares)
        print(f"recorded in {args.record}")


class _Scores(dict):
    """(teacher, student) scores per run key, written to disk after every run: a call that is
    stopped loses at most the run in progress, and a later call on the same workdir re-uses them."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        if path.is_file():
            self.update({k: tuple(v) for k, v in json.loads(path.read_text()).items()})

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.path.write_text(json.dumps(self, indent=0, sort_keys=True))


def _key(cfg: config.Config, name: str, seed: int) -> str:
    stage = cfg.model_dump(mode="json")
    return (f"{gain_records.setting_id(cfg.pipeline.task, stage)} {name} {stage['distill']['unlabeled']!r} "
            f"seed {seed} {cfg.pipeline.device}")


def _paired(a: list[float], b: list[float]) -> dict:
    """a − b paired by seed: mean and std of the differences, the standard error of the mean,
    how many seeds went up, and the smallest gain these seeds could detect."""
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    std = statistics.stdev(diffs) if n > 1 else 0.0
    se = std / n ** 0.5 if n > 1 else float("nan")
    return {"gain": statistics.mean(diffs), "gain_std": std, "se": se, "up": sum(x > 0 for x in diffs),
            "detectable": _detectable(se, n)}


def _table(teacher: dict[int, float], score: dict[str, dict[int, float]], seeds: list[int]) -> dict[str, dict]:
    """Per method: mean and std over the seeds and, against the baseline, the paired gain."""
    rows: dict[str, dict] = {}
    for m in score:
        xs = [score[m][s] for s in seeds]
        row = {"per_seed": xs, "mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
        if m != "none" and "none" in score:
            row.update(_paired(xs, [score["none"][s] for s in seeds]))
        rows[m] = row
    return rows


# MGD's own share: each MGD method against the method without it, both in the table.
_SHARES = (("mgd+kd", "kd"), ("mgd", "kd"), ("mgd+kd+u", "kd+u"), ("mgd+u", "kd+u"), ("mgd+kd+u", "mgd+kd"),
           ("kd+u", "kd"), ("mgd+u", "mgd"))


def _shares(score: dict[str, dict[int, float]], seeds: list[int]) -> dict[str, dict]:
    out = {}
    for a, b in _SHARES:
        if a in score and b in score:
            out[f"{a} vs {b}"] = _paired([score[a][s] for s in seeds], [score[b][s] for s in seeds])
    return out


def _record(path: Path, base: config.Config, cfg: config.Config, args, metric: str, teacher, score, rows, what,
            shares) -> None:
    stage = cfg.model_dump(mode="json")
    task = base.pipeline.task
    methods = {}
    for m, row in rows.items():
        method, _, alpha = m.partition(" α=")
        methods[method] = {
            **row, "unlabeled": args.unlabeled if method.endswith("+u") else "", "alpha": alpha or None}
    gain_records.write(path, {
        "setting_id": gain_records.setting_id(task, stage), "setting": gain_records.setting(task, stage),
        "task": task, "metric": metric, "what": what, "seeds": args.seeds,
        "teacher": {"per_seed": [teacher[s] for s in args.seeds], "mean": statistics.mean(teacher.values())},
        "methods": methods, "shares": shares, "command": "python benchmarks/mgd_gain.py " + shlex.join(sys.argv[1:]),
        "measured": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {_cores()} CPU cores",
    })


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    main()
