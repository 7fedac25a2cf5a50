"""Time ks_gemm kernel variants (block-k depth, blocks per SM, B fragment loads) on the
suite's k = s transposed rows: python3 scripts/ks_sweep.py"""
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402

from ndconv.engine import gpu_ks_gemm as ks  # noqa: E402
from ndconv.engine.cpu import CPUEngine  # noqa: E402
from ndconv.engine.gpu import GPUEngine, cuda_timer  # noqa: E402
from ndconv.geometry import conv_transpose_geometry  # noqa: E402

CASES = {"t2d_unet_k2s2": ((32, 128, 64, 64), (128, 64, 2, 2), 2),
         "t3d_unet_k2s2": ((2, 128, 32, 32, 32), (128, 64, 2, 2, 2), 2),
         "small_check": ((2, 20, 5, 7), (20, 9, 2, 2), 2)}

eng = GPUEngine()
alg = ks.KsGemm()
for name, (xs, ws, s) in CASES.items():
    g = conv_transpose_geometry(xs, ws, None, s, 0)[0]
    rng = np.random.default_rng(0)
    gy = cp.asarray(rng.standard_normal(g.y_shape), dtype=cp.float32)
    w = cp.asarray(rng.standard_normal(g.w_shape), dtype=cp.float32)
    x = cp.asarray(rng.standard_normal(g.x_shape), dtype=cp.float32)
    ref_bi = alg.run(eng, "backward_input", gy, w, g)
    ref_fw = alg.run(eng, "forward", x, w, g)
    if name == "small_check":
        cpu = CPUEngine()
        e1 = float(abs(cp.asnumpy(ref_bi) - cpu.backward_input(cp.asnumpy(gy).astype(np.float64), cp.asnumpy(w).astype(np.float64), g)).max())
        e2 = float(abs(cp.asnumpy(ref_fw) - cpu.forward(cp.asnumpy(x).astype(np.float64), cp.asnumpy(w).astype(np.float64), g)).max())
        print("small check errors", e1, e2)
    for bk, mb, vec in itertools.product((8, 16), (1, 2), (False, True)):
        alg._functions.clear()
        orig = ks.source
        ks.source = lambda gb, sc, _o=orig, bk=bk, mb=mb, vec=vec: _o(gb, sc, bk, mb, vec)
        try:
            bi = alg.run(eng, "backward_input", gy, w, g)
            fw = alg.run(eng, "forward", x, w, g)
            ok = bool((bi == ref_bi).all()) and bool(cp.allclose(fw, ref_fw, rtol=1e-5, atol=1e-4))
            t_bi = cuda_timer(lambda: alg.run(eng, "backward_input", gy, w, g), 20)
            t_fw = cuda_timer(lambda: alg.run(eng, "forward", x, w, g), 20)
            print(f"{name:14s} bk={bk:2d} min_blocks={mb} vec_b={vec:d}  backward_input {t_bi:.3f} ms  "
                  f"forward {t_fw:.3f} ms  same={ok}")
        except Exception as e:
            print(name, bk, mb, vec, "failed:", type(e).__name__, str(e)[:300])
        finally:
            ks.source = orig
    alg._functions.clear()
