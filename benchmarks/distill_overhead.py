"""What does MGD itself cost per training step? (issue: ≤ 10% over student step + teacher forward)

In one run, interleaved so drift on a noisy machine hits every variant alike, the median
wall time of
  (a) a student train step alone (forward, cross-entropy, backward, SGD step);
  (b) (a) plus the frozen teacher's forward (what any feature distillation pays);
  (c) the full MGD distillation step, built from the distill stage's own code (feature taps,
      MGDHead, its loss function, the MGD blocks in the optimizer);
and the ratios (c)/(b) (MGD's own cost) and (c)/(a).

    python benchmarks/distill_overhead.py                       # resnet34 -> resnet18, 32² b64 and 224² b16
    python benchmarks/distill_overhead.py --sizes 224 --batches 32 --steps 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.config import from_dict
from pipeline.tasks.classification.models import build_model
from pipeline.tasks import get_task
from stages.mgd import FeatureTap, MGDHead


def _step_fns(teacher_arch: str, student_arch: str, size: int, batch: int, small_input: str):
    torch.manual_seed(0)
    student = build_model(student_arch, 10, image_size=size, small_input=small_input)
    teacher = build_model(teacher_arch, 10, image_size=size, small_input=small_input).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    cfg = from_dict({"distill": {"student": student_arch, "method": "mgd"}}).distill  # the task's MGD defaults
    task = get_task("classification")
    head = MGDHead(student, teacher, cfg.mgd.student_layers, cfg.mgd.teacher_layers, (3, size, size),
                   alpha=cfg.mgd.alpha, mask_ratio=cfg.mgd.mask_ratio, mask=cfg.mgd.mask)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    opt_a = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    opt_c = torch.optim.SGD(list(student.parameters()) + list(head.parameters()), lr=1e-3, momentum=0.9)

    def a():
        loss = F.cross_entropy(student(x), y)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()

    def b():
        logits = student(x)
        with torch.no_grad():
            teacher(x)
        loss = F.cross_entropy(logits, y)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()

    s_tap = FeatureTap(student, cfg.mgd.student_layers, role="student")
    t_tap = FeatureTap(teacher, cfg.mgd.teacher_layers, role="teacher")
    def mgd_loss(model, images, labels):
        # What stages/distill_loss.py builds for method "mgd": task loss + MGD on the tapped features.
        logits = model(images)
        with torch.no_grad():
            teacher(images)
        return task.loss(logits, labels, cfg) + head(s_tap.take(), t_tap.take()), logits

    def c():
        loss, _ = mgd_loss(student, x, y)
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()

    def untapped(fn):
        # (a) and (b) must not pay for the hooks that (c) uses: drop captured features after.
        def run():
            fn()
            s_tap.features.clear()
            t_tap.features.clear()
        return run

    shapes = [(l.student_channels, l.teacher_channels) for l in head.losses]
    return {"a": untapped(a), "b": untapped(b), "c": c}, shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet34")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 16], help="one per size")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--small-input", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--threads", type=int, default=0, help="0: all cores")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for size, batch in zip(args.sizes, args.batches):
        fns, shapes = _step_fns(args.teacher, args.student, size, batch, args.small_input)
        for _ in range(args.warmup):
            for fn in fns.values():
                fn()
        times = {k: [] for k in fns}
        for _ in range(args.steps):
            for k, fn in fns.items():  # interleaved: a, b, c, a, b, c, ...
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append((size, batch, med, shapes))
    print(f"\n{args.teacher} -> {args.student}, small_input={args.small_input}, {torch.get_num_threads()} threads, "
          f"median of {args.steps} interleaved steps, torch {torch.__version__}")
    print(f"{'input':>7} {'batch':>5} {'(a) student':>12} {'(b) +teacher':>13} {'(c) MGD':>10} {'(c)/(b)':>8} {'(c)/(a)':>8}")
    for size, batch, med, shapes in rows:
        print(f"{size:>5}² {batch:>5} {med['a']:>10.1f}ms {med['b']:>11.1f}ms {med['c']:>8.1f}ms "
              f"{med['c'] / med['b']:>8.3f} {med['c'] / med['a']:>8.3f}")


if __name__ == "__main__":
    main()
