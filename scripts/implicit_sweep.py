"""Time implicit_gemm kernel variants (k-step depth, blocks per SM) against the engine's
other algorithms on suite-sized calls: python3 scripts/implicit_sweep.py"""
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402

from ndconv.engine import gpu_implicit as im  # noqa: E402
from ndconv.engine.gpu import ALGORITHMS, GPUEngine, cuda_timer  # noqa: E402
from ndconv.geometry import conv_geometry, conv_transpose_geometry  # noqa: E402

CALLS = [  # (label, geometry, engine op)
    ("t2d_unet_k2s2 fwd", conv_transpose_geometry((32, 128, 64, 64), (128, 64, 2, 2), None, 2)[0], "backward_input"),
    ("t3d_unet_k2s2 fwd", conv_transpose_geometry((2, 128, 32, 32, 32), (128, 64, 2, 2, 2), None, 2)[0],
     "backward_input"),
    ("t2d_dcgan_k4s2 fwd", conv_transpose_geometry((64, 256, 16, 16), (256, 128, 4, 4), None, 2, 1)[0],
     "backward_input"),
    ("t1d_vocoder fwd", conv_transpose_geometry((16, 512, 1024), (512, 256, 16), None, 8, 4)[0], "backward_input"),
    ("c2d_resnet_s2 bwd_data", conv_geometry((64, 128, 28, 28), (256, 128, 3, 3), stride=2, padding=1)[0],
     "backward_input"),
    ("c2d_resnet_s2 fwd", conv_geometry((64, 128, 28, 28), (256, 128, 3, 3), stride=2, padding=1)[0], "forward"),
    ("c2d_resnet3x3 fwd", conv_geometry((64, 64, 56, 56), (64, 64, 3, 3), padding=1)[0], "forward"),
    ("c2d_1x1 fwd", conv_geometry((64, 256, 14, 14), (1024, 256, 1, 1))[0], "forward"),
]

eng = GPUEngine()
alg = im.ImplicitGemm()
for label, g, op in CALLS:
    rng = np.random.default_rng(0)
    a = cp.asarray(rng.standard_normal(g.x_shape if op == "forward" else g.y_shape), dtype=cp.float32)
    w = cp.asarray(rng.standard_normal(g.w_shape), dtype=cp.float32)
    others = {}
    for name in ("cudnn_graph", "cudnn", "im2col_gemm", "phases"):
        other = ALGORITHMS.get(name)
        if other.supports(op, g, np.float32):
            try:
                others[name] = cuda_timer(lambda: other.run(eng, op, a, w, g), 10)
                ref = other.run(eng, op, a, w, g)
            except Exception as e:  # e.g. cuDNN missing
                others[name] = f"{type(e).__name__}"
    line = "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in others.items())
    print(f"{label:24s} {line}", flush=True)
    for bk, mb in itertools.product((8, 16), (1, 2)):
        alg._functions.clear()
        orig = im.source
        im.source = lambda dense_b, _o=orig, bk=bk, mb=mb: _o(dense_b, bk, mb)
        try:
            got = alg.run(eng, op, a, w, g)
            err = float(cp.abs(got - ref).max() / cp.abs(ref).max())
            t = cuda_timer(lambda: alg.run(eng, op, a, w, g), 10)
            print(f"{'':24s} implicit bk={bk:2d} min_blocks={mb}: {t:.3f} ms  rel err {err:.1e}", flush=True)
        finally:
            im.source = orig
    alg._functions.clear()
