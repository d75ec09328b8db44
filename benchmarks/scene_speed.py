"""How fast is the digit scene generator? (target: ≤ 3 s for 2,000 canvases at 64 px, one core)

Times :func:`pipeline.tasks.common.scenes.make_scenes` with the default :class:`SceneSpec` after one warm-up
call (which also loads scikit-learn's digits), on one torch thread by default. Prints the best
wall time and the best CPU time of the process: on a shared machine the wall time includes
waiting for a core, the CPU time does not.

    python benchmarks/scene_speed.py                      # 2,000 canvases, 64 px, 1 thread, 5 runs
    python benchmarks/scene_speed.py --n 5000 --size 128 --threads 4
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="canvases per call")
    parser.add_argument("--size", type=int, default=64, help="canvas side in pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--runs", type=int, default=5, help="timed calls (best is reported)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from pipeline.tasks.common.scenes import SceneSpec, make_scenes, split_pools

    pool, _ = split_pools(seed=0, val_fraction=0.2)
    spec = SceneSpec(image_size=args.size)
    make_scenes(spec, 50, seed=0, pool=pool)  # warm-up: digits load, kernel first calls
    wall, cpu = [], []
    for run in range(args.runs):
        t0, c0 = time.perf_counter(), time.process_time()
        make_scenes(spec, args.n, seed=run, pool=pool)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(
        f"make_scenes: {args.n} canvases at {args.size} px, {args.threads} thread(s): "
        f"best wall {min(wall):.2f} s (runs {' '.join(f'{w:.2f}' for w in wall)}), best CPU {min(cpu):.2f} s"
    )


if __name__ == "__main__":
    main()
