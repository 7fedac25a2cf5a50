"""Time the ``plane`` kernels of suite cases under several shared-memory budgets per block.

The budget decides the slab depth (TZ), hence blocks per SM against halo re-reads;
this shows which budget the plan should aim for.

    python3 scripts/plane_sweep.py [--cases a,b] [--dtype float32] [--limits 16384,24576,49152]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402

from ndconv import bench  # noqa: E402
from ndconv.engine import gpu_plane  # noqa: E402
from ndconv.engine.gpu import GPUEngine, cuda_timer  # noqa: E402

OPERANDS = {"forward": ("x", "w"), "backward_input": ("y", "w"), "backward_weight": ("x", "y")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="c2d_depthwise,c3d_depthwise,c1d_depthwise31,c2d_grouped32")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--limits", default="12288,16384,24576,32768,49152")
    ap.add_argument("--vec-ab", action="store_true",
                    help="instead: each op with 16-byte input loads on and off")
    ap.add_argument("--wgrad-acc", default=None,
                    help="instead: the weight gradient with these MAX_WGRAD_ACC values, e.g. 36,72")
    ap.add_argument("--wgrad-minb", default=None,
                    help="instead: the weight gradient with these WGRAD_MIN_BLOCKS values, e.g. 1,2,3")
    args = ap.parse_args(argv)
    if args.vec_ab or args.wgrad_acc or args.wgrad_minb:
        return compare(args)
    limits = [int(v) for v in args.limits.split(",")]
    engine = GPUEngine(autotune=False)
    plane = engine.algorithms.get("plane")
    saved = gpu_plane.SMEM_LIMIT
    for case in bench.select_cases(bench.load_suite(bench.DEFAULT_SUITE)["gpu"], args.cases):
        g = case.geometry()
        arrays = {name: cp.random.standard_normal(shape, dtype=np.float32).astype(args.dtype)
                  for name, shape in (("x", g.x_shape), ("w", g.w_shape), ("y", g.y_shape))}
        for op, (a, b) in OPERANDS.items():
            cells = []
            for limit in limits:
                gpu_plane.SMEM_LIMIT = limit
                gpu_plane.plan.cache_clear()
                p = gpu_plane.plan(op, g, args.dtype)
                if p is None:
                    cells.append(f"{limit // 1024}K: -")
                    continue
                c = dict(p.consts)
                ms = cuda_timer(lambda: plane.run(engine, op, arrays[a], arrays[b], g), 10)
                cells.append(f"{limit // 1024}K: {ms:.3f} (TZ {c['TZ']}, NT {c['NT']}, VX {c['VX']})")
            print(f"{case.name:16s} {op:16s} " + "  ".join(cells), flush=True)
    gpu_plane.SMEM_LIMIT = saved
    gpu_plane.plan.cache_clear()


def compare(args):
    engine = GPUEngine(autotune=False)
    plane = engine.algorithms.get("plane")
    aligned, acc, minb = gpu_plane._ALIGNED, gpu_plane.MAX_WGRAD_ACC, gpu_plane.WGRAD_MIN_BLOCKS
    for case in bench.select_cases(bench.load_suite(bench.DEFAULT_SUITE)["gpu"], args.cases):
        g = case.geometry()
        arrays = {name: cp.random.standard_normal(shape, dtype=np.float32).astype(args.dtype)
                  for name, shape in (("x", g.x_shape), ("w", g.w_shape), ("y", g.y_shape))}
        for op, (a, b) in OPERANDS.items():
            if args.vec_ab:
                variants = {"vec": aligned, "scalar": (aligned[0], aligned[0])}
                knob = "_ALIGNED"
            elif op == "backward_weight" and args.wgrad_acc:
                variants = {f"acc{v}": int(v) for v in args.wgrad_acc.split(",")}
                knob = "MAX_WGRAD_ACC"
            elif op == "backward_weight":
                variants = {f"minb{v}": int(v) for v in args.wgrad_minb.split(",")}
                knob = "WGRAD_MIN_BLOCKS"
            else:
                continue
            cells = []
            for label, value in variants.items():
                setattr(gpu_plane, knob, value)
                gpu_plane.plan.cache_clear()
                plane._calls.clear()
                c = dict(gpu_plane.plan(op, g, args.dtype).consts)
                ms = [cuda_timer(lambda: plane.run(engine, op, arrays[a], arrays[b], g), 10) for _ in range(3)]
                cells.append(f"{label}: {sorted(ms)[1]:.3f} (OCB {c.get('OCB', '-')}, CIB {c.get('CIB', '-')})")
            print(f"{case.name:16s} {op:16s} " + "  ".join(cells), flush=True)
    gpu_plane._ALIGNED, gpu_plane.MAX_WGRAD_ACC, gpu_plane.WGRAD_MIN_BLOCKS = aligned, acc, minb
    gpu_plane.plan.cache_clear()


if __name__ == "__main__":
    main()
