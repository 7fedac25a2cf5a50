"""Where the GPU time goes: per suite case and op, every candidate algorithm's time.

For each ``gpu`` case of the suite and each of the three bench ops it prints the
engine primitive the op maps to, the CUDA-event time of every GPU algorithm that
supports the call (forced one at a time, through ``Algorithm.run``), the
wall-clock time of the whole ndconv call (Python included) and of PyTorch's, so
that a slow row can be told apart into "slow kernel" and "slow Python".

    python3 scripts/gpu_profile.py [--cases a,b] [--dtype float32] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import ndconv  # noqa: E402
from ndconv import bench  # noqa: E402
from ndconv.engine.gpu import GPUEngine, cuda_timer  # noqa: E402

# bench op -> (engine primitive, names of its two operands in conv terms)
CONV_OPS = {"fwd": ("forward", "x", "w"), "bwd_data": ("backward_input", "y", "w"),
            "bwd_weight": ("backward_weight", "x", "y")}
DECONV_OPS = {"fwd": ("backward_input", "y", "w"), "bwd_data": ("forward", "x", "w"),
              "bwd_weight": ("backward_weight", "x", "y")}


def wall_ms(fn, repeat=20):
    fn()
    cp.cuda.Device().synchronize()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        cp.cuda.Device().synchronize()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        cp.cuda.Device().synchronize()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def profile_case(name, dtype):
    import cProfile
    import pstats
    case = bench.select_cases(bench.load_suite(bench.DEFAULT_SUITE)["gpu"], name)[0]
    x, w, gy = bench.make_inputs(case, dtype)
    fns = bench.ndconv_calls(case, *(cp.asarray(a) for a in (x, w, gy)))
    ndconv.get_engine(cp.empty(0)).autotune = True
    for bop, fn in fns.items():
        fn()
        cp.cuda.Device().synchronize()
        host = []
        for _ in range(50):
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
            cp.cuda.Device().synchronize()
        print(f"{name} {bop}: host time per call {1e6 * sorted(host)[25]:.1f} us", flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            fn()
            cp.cuda.Device().synchronize()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--overhead", action="store_true",
                    help="also print a cProfile of 2000 tiny ndconv calls (where the Python time goes)")
    ap.add_argument("--overhead-case", default=None,
                    help="also print a cProfile of 300 calls of each op of this suite case, and the "
                         "host time of one call (launch to return, no synchronisation)")
    args = ap.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cases = bench.select_cases(bench.load_suite(bench.DEFAULT_SUITE)["gpu"], args.cases)
    dtype = np.dtype(args.dtype)
    engine = GPUEngine(autotune=False)
    rows = []
    # Python overhead of one tiny call, both libraries.
    xt = cp.ones((1, 1, 4, 4), dtype)
    wt = cp.ones((1, 1, 1, 1), dtype)
    tx, tw = torch.ones(1, 1, 4, 4, device="cuda", dtype=getattr(torch, dtype.name)), \
        torch.ones(1, 1, 1, 1, device="cuda", dtype=getattr(torch, dtype.name))
    print(f"tiny conv2d wall: ndconv {wall_ms(lambda: ndconv.conv_nd(xt, wt), 200) * 1e3:.1f} us, "
          f"torch {wall_ms(lambda: torch.ops.aten.convolution(tx, tw, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1), 200) * 1e3:.1f} us",
          flush=True)
    if args.overhead:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2000):
            ndconv.conv_nd(xt, wt)
        cp.cuda.Device().synchronize()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    if args.overhead_case:
        profile_case(args.overhead_case, dtype)
    for case in cases:
        g = case.geometry()
        arrays = {"x": cp.random.standard_normal(g.x_shape, dtype=np.float32).astype(dtype),
                  "w": cp.random.standard_normal(g.w_shape, dtype=np.float32).astype(dtype),
                  "y": cp.random.standard_normal(g.y_shape, dtype=np.float32).astype(dtype)}
        x, w, gy = bench.make_inputs(case, dtype)
        nd_fns = bench.ndconv_calls(case, *(cp.asarray(a) for a in (x, w, gy)))
        th = [torch.as_tensor(a).cuda() for a in (x, w, gy)]
        th_fns = bench.torch_calls(case, *th)
        ops = DECONV_OPS if case.transposed else CONV_OPS
        for bop, (op, a, b) in ops.items():
            times = {}
            for alg in engine.algorithms.candidates(op, g, dtype, True):
                try:
                    times[alg.name] = cuda_timer(lambda: alg.run(engine, op, arrays[a], arrays[b], g), 10)
                except Exception as e:  # noqa: BLE001 - report, keep going
                    times[alg.name] = f"{type(e).__name__}: {e}"[:80]
            nd_engine = ndconv.get_engine(arrays["x"])
            nd_engine.autotune = True
            nd_wall = wall_ms(nd_fns[bop])
            th_wall = wall_ms(th_fns[bop])
            row = {"case": case.name, "op": bop, "primitive": op, "algorithms": times,
                   "chosen": nd_engine.last_algorithm.get(op), "ndconv_wall_ms": nd_wall,
                   "torch_wall_ms": th_wall}
            rows.append(row)
            algs = "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in times.items())
            print(f"{case.name:16s} {bop:10s} {op:15s} ndconv {nd_wall:7.3f} torch {th_wall:7.3f} "
                  f"ratio {nd_wall / th_wall:5.2f} chosen {row['chosen']}  | {algs}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
