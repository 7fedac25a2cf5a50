"""How much of a GPU call is host time: per row, with a forced algorithm.

For each ``case:op:algorithm`` it prints the median host time of one call (until it
returned, before the sync) against its whole time, the same for ten calls queued
without a sync (host time close to the whole time: the row is bound by its host,
not the device), and the functions that took the host's time (cProfile, by own time).
It starts with the time of a fixed Python loop, to compare hosts.

    python3 scripts/gpu_host.py c1d_audio:bwd_weight:im2col_tf32x3,t3d_k4s2p1:bwd_weight:phases
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import cupy as cp  # noqa: E402

import ndconv  # noqa: E402
from ndconv import bench  # noqa: E402

# bench op -> engine primitive, for convolutions and transposed convolutions
PRIMITIVE = {False: {"fwd": "forward", "bwd_data": "backward_input", "bwd_weight": "backward_weight"},
             True: {"fwd": "backward_input", "bwd_data": "forward", "bwd_weight": "backward_weight"}}


def python_loop_ms(steps=3_000_000):
    t0 = time.perf_counter()
    total = 0
    for i in range(steps):
        total += i
    return (time.perf_counter() - t0) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", help="case:op:algorithm[,...] (op: fwd, bwd_data, bwd_weight)")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"host: a {3_000_000:,}-step Python loop takes {python_loop_ms():.0f} ms", flush=True)
    suite = {c.name: c for c in bench.load_suite(bench.DEFAULT_SUITE)["gpu"]}
    engine = ndconv.get_engine(cp.empty(0))
    sync = cp.cuda.Device().synchronize
    for row in args.rows.split(","):
        name, op, algorithm = row.split(":")
        case = suite[name]
        x, w, gy = (cp.asarray(a) for a in bench.make_inputs(case, "float32"))
        call = bench.ndconv_calls(case, x, w, gy)[op]
        with engine.force(PRIMITIVE[case.transposed][op], algorithm):
            call()
            call()
            sync()
            host, whole = [], []
            for _ in range(args.repeat):
                sync()
                t0 = time.perf_counter()
                call()
                t1 = time.perf_counter()
                sync()
                host.append(t1 - t0)
                whole.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(10):
                call()
            queued_host = time.perf_counter() - t0
            sync()
            queued = time.perf_counter() - t0
            print(f"{name} {op} [{algorithm}]: one call host {statistics.median(host) * 1e3:.3f} of "
                  f"{statistics.median(whole) * 1e3:.3f} ms; 10 queued: host {queued_host * 1e3:.2f} of "
                  f"{queued * 1e3:.2f} ms", flush=True)
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.repeat):
                call()
            sync()
            profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(10)
        print("\n".join(line[:160] for line in text.getvalue().splitlines()[6:] if line.strip()), flush=True)


if __name__ == "__main__":
    main()
