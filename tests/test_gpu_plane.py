"""The ``plane`` GPU algorithm (grouped and depthwise convolutions from whole planes in
shared memory): its plan, checked anywhere, and its kernels against the CPU engine
(float64) and PyTorch, on a GPU only.
"""
from __future__ import annotations

import numpy as np
import pytest

import ndconv
from gpu_support import check_forced, on_gpu
from ndconv.engine import gpu_plane
from ndconv.engine.registry import OPS

try:
    import hypothesis as hyp
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    hyp = None


def geometry(x_shape, w_shape, **kw):
    return ndconv.conv_geometry(x_shape, w_shape, None, **kw)[0]


def transposed(x_shape, w_shape, **kw):
    return ndconv.conv_transpose_geometry(x_shape, w_shape, None, **kw)[0]


PLANE_GEOMETRIES = [
    geometry((3, 16, 28, 28), (16, 4, 3, 3), padding=1, groups=4),
    geometry((2, 12, 9, 13), (18, 2, 3, 2), stride=(2, 1), padding=[(1, 0), (2, 1)], dilation=(1, 2), groups=6),
    geometry((2, 6, 37), (12, 3, 5), stride=2, padding=[(3, 1)], dilation=2, groups=2),
    geometry((2, 4, 300), (8, 1, 31), padding=[(15, 14)], groups=4),
    geometry((2, 4, 5, 9, 7), (4, 2, 3, 3, 2), stride=(1, 2, 1), padding=[(1, 0), (1, 2), (0, 1)], groups=2),
    geometry((1, 3, 19, 21, 20), (6, 1, 3, 3, 3), padding=1, groups=3),            # slabs in depth
    geometry((2, 2, 150, 90), (2, 1, 3, 3), padding=1, groups=2),                  # slabs of rows
    geometry((1, 8, 11, 10), (8, 4, 3, 3), padding=[(4, 0), (0, 3)], groups=2),    # padding > (K-1)*D
    geometry((2, 3, 30), (6, 1, 3), padding=1, groups=3),
    transposed((2, 4, 6, 7), (4, 2, 4, 4), stride=2, padding=1, groups=2),
]


def test_plan_fits_shared_memory_and_covers_the_outputs():
    for g in PLANE_GEOMETRIES:
        for op in OPS:
            for dtype in ("float16", "float32", "float64"):
                p = gpu_plane.plan(op, g, dtype)
                if op == "backward_input" and any(s > 1 for s in g.stride):
                    assert p is None
                    continue
                assert p is not None, (op, g)
                c = dict(p.consts)
                assert c["NT"] % 32 == 0 and 32 <= c["NT"] <= 256
                assert c["FLIP"] == (op == "backward_input") and c["WGRAD"] == (op == "backward_weight")
                # one slab per grid x for conv, every output slice covered
                if op != "backward_weight":
                    assert p.grid[0] * c["TZ"] >= c["YZ"] > (p.grid[0] - 1) * c["TZ"]
                    assert p.grid[1] == g.groups
                else:
                    assert c["CIG"] % c["CIB"] == 0 and c["CIB"] * c["ICBLK"] == c["CIG"]
                    assert c["COG"] % c["OCB"] == 0
                    assert p.grid[0] == g.y_channels // c["OCB"] * c["ICBLK"] * p.parts
                itemsize = 8 if dtype == "float64" else 4
                iz, py, pxp, *_, slab = gpu_plane._layout(
                    (c["KZ"], c["KY"], c["KX"]), (c["SZ"], c["SY"], c["SX"]),
                    (c["DZ"], c["DY"], c["DX"]), (c["YZ"], c["YY"], c["YX"]), c["TZ"], c["VX"], c["VEC"])
                planes = c["CIB"] if op == "backward_weight" else c["CIG"]
                assert planes * slab * itemsize <= gpu_plane.SMEM_LIMIT
                assert pxp % c["VEC"] == 0 and (c["VX"] * c["SX"]) % c["VEC"] == 0


def test_plan_views_and_declines():
    dw2 = geometry((2, 8, 56, 56), (8, 1, 3, 3), padding=1, groups=8)
    c = dict(gpu_plane.plan("forward", dw2, "float32").consts)
    assert (c["YZ"], c["YY"], c["YX"]) == (56, 1, 56)       # 2-D rows are the slab axis
    assert c["TZ"] == 56 and c["VX"] == 4                   # the whole plane fits
    one = geometry((2, 8, 100), (8, 1, 3), padding=1, groups=8)
    c = dict(gpu_plane.plan("forward", one, "float32").consts)
    assert (c["YZ"], c["YY"], c["YX"]) == (1, 1, 100)
    too_long = geometry((1, 2, 40000), (2, 1, 3), padding=1, groups=2)    # one line over 48 KiB
    assert gpu_plane.plan("forward", too_long, "float32") is None
    many_taps = geometry((1, 2, 12, 12, 12), (2, 1, 5, 5, 5), padding=2, groups=2)
    assert gpu_plane.plan("forward", many_taps, "float32") is not None
    assert gpu_plane.plan("backward_weight", many_taps, "float32") is None   # 125 sums per thread
    grouped = geometry((2, 64, 28, 28), (64, 8, 3, 3), padding=1, groups=8)
    c = dict(gpu_plane.plan("backward_weight", grouped, "float32").consts)
    assert (c["OCB"], c["CIB"]) == (4, 2)          # 72 sums per thread (WGRAD_PAIR_ACC), balanced
    assert c["MINB"] == gpu_plane.WGRAD_PAIR_MIN_BLOCKS
    dw = geometry((2, 8, 28, 28), (8, 1, 3, 3), padding=1, groups=8)
    c = dict(gpu_plane.plan("backward_weight", dw, "float32").consts)
    assert (c["OCB"], c["CIB"], c["MINB"]) == (1, 1, gpu_plane.WGRAD_MIN_BLOCKS)    # depthwise: 9 sums
    long_window = dict(gpu_plane.plan("forward", geometry((2, 8, 2048), (8, 1, 31), padding=15, groups=8),
                                      "float32").consts)
    assert long_window["USE_WIN"] == 1 and long_window["CMINB"] == gpu_plane.LONG_WINDOW_THREADS // long_window["NT"]
    assert "CMINB" not in dict(gpu_plane.plan("forward", dw, "float32").consts)
    # the algorithm leaves dense calls alone
    assert not gpu_plane.Plane().supports("forward", geometry((1, 4, 8, 8), (4, 4, 3, 3)), np.float32)


# ---------------------------------------------------------------------- on a GPU

def _check(g, dtype, seed=0):
    ops = [op for op in OPS if gpu_plane.Plane().supports(op, g, dtype)]
    check_forced("plane", g, dtype, ops, seed)


@pytest.mark.parametrize("dtype", ("float64", "float32", "float16"))
@pytest.mark.parametrize("g", PLANE_GEOMETRIES, ids=lambda g: f"{g.nd}d-{g.x_shape}-{g.w_shape}-s{g.stride}")
@pytest.mark.gpu
@on_gpu
def test_plane_vs_cpu(g, dtype):
    _check(g, dtype)


if hyp is not None:
    @st.composite
    def grouped_geometries(draw):
        nd = draw(st.integers(1, 3))
        groups = draw(st.integers(2, 4))
        cig, cog = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        kernel, stride, dil, lo, hi, xs = [], [], [], [], [], []
        for _ in range(nd):
            k, s, d = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
            a, b = draw(st.integers(0, 3)), draw(st.integers(0, 3))
            span = d * (k - 1) + 1
            xs.append(max(1, span - a - b + draw(st.integers(0, 12 if nd < 3 else 5))))
            for seq, v in zip((kernel, stride, dil, lo, hi), (k, s, d, a, b)):
                seq.append(v)
        pad = [(a, b) for a, b in zip(lo, hi)]
        return geometry((draw(st.integers(1, 3)), groups * cig) + tuple(xs), (groups * cog, cig) + tuple(kernel),
                        stride=tuple(stride), padding=pad, dilation=tuple(dil), groups=groups)

    @pytest.mark.gpu
    @on_gpu
    @hyp.settings(max_examples=40, deadline=None)
    @hyp.given(g=grouped_geometries(), seed=st.integers(0, 2 ** 16))
    def test_plane_random_geometries(g, seed):
        _check(g, "float64", seed)


@pytest.mark.parametrize("dtype", ("float32", "float16"))
@pytest.mark.gpu
@on_gpu
def test_plane_deterministic(dtype):
    """Bitwise repeats, including a weight gradient summed over many parts."""
    import cupy as cp
    from ndconv.engine.gpu import GPUEngine
    for g in (geometry((16, 32, 20, 20), (32, 4, 3, 3), padding=1, groups=8),
              geometry((8, 16, 3000), (16, 1, 31), padding=15, groups=16)):
        rng = np.random.default_rng(3)
        x, w, y = (cp.asarray(rng.standard_normal(s).astype(dtype)) for s in (g.x_shape, g.w_shape, g.y_shape))
        runs = [(GPUEngine(algorithm="plane").forward(x, w, g), GPUEngine(algorithm="plane").backward_input(y, w, g),
                 GPUEngine(algorithm="plane").backward_weight(x, y, g)) for _ in range(2)]
        for first, again in zip(*runs):
            assert bool(cp.all(first.view(cp.uint16 if dtype == "float16" else cp.uint32) ==
                               again.view(cp.uint16 if dtype == "float16" else cp.uint32)))


@pytest.mark.gpu
@on_gpu
def test_plane_input_not_16_byte_aligned():
    """A contiguous input that starts 4 bytes into its buffer takes the scalar loads."""
    import cupy as cp
    from ndconv.engine.cpu import CPUEngine
    from ndconv.engine.gpu import GPUEngine
    g = geometry((2, 4, 12, 16), (8, 2, 3, 3), padding=1, groups=2)
    assert dict(gpu_plane.plan("forward", g, "float32").consts)["FILL_VEC"] == 1
    rng = np.random.default_rng(5)
    x, w, y = (rng.standard_normal(s).astype(np.float32) for s in (g.x_shape, g.w_shape, g.y_shape))
    buf = cp.empty(x.size + 1, dtype=cp.float32)
    xd = buf[1:].reshape(x.shape)
    xd[...] = cp.asarray(x)
    assert xd.flags.c_contiguous and xd.data.ptr % 16 != 0
    eng, cpu = GPUEngine(algorithm="plane"), CPUEngine()
    for op, got, ref in (("forward", eng.forward(xd, cp.asarray(w), g), cpu.forward(x, w, g)),
                         ("backward_weight", eng.backward_weight(xd, cp.asarray(y), g),
                          cpu.backward_weight(x, y, g))):
        np.testing.assert_allclose(cp.asnumpy(got), ref, rtol=1e-4, atol=1e-4, err_msg=op)
