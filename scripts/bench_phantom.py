"""Time one phantom case (H&E + 2 IHC) at --size-px, rendering slides in 1 thread and in 3.

    .venv/bin/python scripts/bench_phantom.py [--size-px 8192]

Prints wall and CPU seconds per case (CPU-s do not depend on other load on the machine),
level-0 megapixels per second, and the speed-up of 3 threads over 1.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from histocsc.synthetic.generate import make_case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-px", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    mpx = 3 * args.size_px**2 / 1e6
    print(f"cpus: {os.cpu_count()}  case: 3 slides of {args.size_px} px ({mpx:.0f} Mpx)")
    times = {}
    for workers in (1, 3):
        with tempfile.TemporaryDirectory() as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            make_case(tmp, "bench", args.seed, size_px=args.size_px, workers=workers)
            times[workers] = time.perf_counter() - t0
            cpu = time.process_time() - c0
        print(f"threads {workers}: {times[workers]:.1f} s/case wall, {cpu:.1f} CPU-s, "
              f"{mpx / times[workers]:.1f} Mpx/s (os.getloadavg: {os.getloadavg()[0]:.1f})")
    print(f"speed-up threads 3 vs 1: {times[1] / times[3]:.2f}x")


if __name__ == "__main__":
    main()
