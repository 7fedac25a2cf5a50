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


def cases(args):
    """(case, geometry, arrays by operand name) of each selected suite case."""
    for case in bench.select_cases(bench.load_suite(bench.DEFAULT_SUITE)["gpu"], args.cases):
        g = case.geometry()
        arrays = {name: cp.random.standard_normal(shape, dtype=np.float32).astype(args.dtype)
                  for name, shape in (("x", g.x_shape), ("w", g.w_shape), ("y", g.y_shape))}
        yield case, g, arrays


def time_plan(engine, op, g, arrays, dtype, repeat=1):
    """(median ms, consts) of ``plane`` under the module's current settings, or None
    when it cannot do the call; both plan caches are cleared first."""
    plane = engine.algorithms.get("plane")
    gpu_plane.plan.cache_clear()
    plane._calls.clear()
    p = gpu_plane.plan(op, g, dtype)
    if p is None:
        return None
    a, b = (arrays[name] for name in OPERANDS[op])
    ms = sorted(cuda_timer(lambda: plane.run(engine, op, a, b, g), 10) for _ in range(repeat))
    return ms[len(ms) // 2], dict(p.consts)


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
    engine = GPUEngine(autotune=False)
    saved = gpu_plane.SMEM_LIMIT
    for case, g, arrays in cases(args):
        for op in OPERANDS:
            cells = []
            for limit in (int(v) for v in args.limits.split(",")):
                gpu_plane.SMEM_LIMIT = limit
                got = time_plan(engine, op, g, arrays, args.dtype)
                if got is None:
                    cells.append(f"{limit // 1024}K: -")
                    continue
                ms, c = got
                cells.append(f"{limit // 1024}K: {ms:.3f} (TZ {c['TZ']}, NT {c['NT']}, VX {c['VX']})")
            print(f"{case.name:16s} {op:16s} " + "  ".join(cells), flush=True)
    gpu_plane.SMEM_LIMIT = saved
    gpu_plane.plan.cache_clear()


def compare(args):
    engine = GPUEngine(autotune=False)
    aligned, acc, minb = gpu_plane._ALIGNED, gpu_plane.MAX_WGRAD_ACC, gpu_plane.WGRAD_MIN_BLOCKS
    for case, g, arrays in cases(args):
        for op in OPERANDS:
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
                ms, c = time_plan(engine, op, g, arrays, args.dtype, repeat=3)
                cells.append(f"{label}: {ms:.3f} (OCB {c.get('OCB', '-')}, CIB {c.get('CIB', '-')})")
            print(f"{case.name:16s} {op:16s} " + "  ".join(cells), flush=True)
    gpu_plane._ALIGNED, gpu_plane.MAX_WGRAD_ACC, gpu_plane.WGRAD_MIN_BLOCKS = aligned, acc, minb
    gpu_plane.plan.cache_clear()


if __name__ == "__main__":
    main()
