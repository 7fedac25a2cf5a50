"""The CPU engine's "grouped" algorithm (compiled direct loops for few channels per group)
forced on every primitive and compared with the naive float64 reference, and its place
in the untuned choice."""
import numpy as np
import pytest

import ndconv
import reference as ref
from ndconv.engine import cpu_grouped
from ndconv.engine.cpu import CPUEngine

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # a test extra
    given = None

pytestmark = pytest.mark.skipif(not cpu_grouped.AVAILABLE, reason="needs numba")

OPS = ("forward", "backward_input", "backward_weight")
TOL = {np.float64: 1e-10, np.float32: 1e-4, np.float16: 2e-2}


def geometry(x_shape, w_shape, **kw):
    return ndconv.conv_geometry(x_shape, w_shape, None, **kw)[0]


def _check_grouped(rng, batch, c_in, c_out, groups, x_size, kernel, stride, dilation, lo, hi,
                   dtypes=(np.float64, np.float32)):
    nd = len(x_size)
    pad = ref.pairs(lo, hi)
    x = rng.standard_normal((batch, c_in) + tuple(x_size))
    w = rng.standard_normal((c_out, c_in // groups) + tuple(kernel))
    g = geometry(x.shape, w.shape, stride=stride, padding=pad, dilation=dilation, groups=groups)
    gy = rng.standard_normal(g.y_shape)
    expected = {
        "forward": ref.conv(x, w, None, stride, pad, dilation, groups),
        "backward_input": ref.conv_grad_input(gy, w, x_size, stride, pad, dilation, groups),
        "backward_weight": ref.conv_grad_weight(x, gy, w.shape, stride, pad, dilation, groups),
    }
    args = {"forward": (x, w), "backward_input": (gy, w), "backward_weight": (x, gy)}
    e = CPUEngine()
    for op in OPS:
        assert e.supports("grouped", op, g), (op, g)
        want = expected[op]
        for dtype in dtypes:
            a, b = (v.astype(dtype) for v in args[op])
            with e.force("grouped"):
                got = getattr(e, op)(a, b, g)
            assert got.dtype == dtype and got.shape == want.shape
            scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
            np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale,
                                       err_msg=f"{op} {np.dtype(dtype).name} nd={nd} stride={stride} "
                                               f"dilation={dilation} lo={lo} hi={hi}")


@pytest.mark.parametrize("nd, x_size, kernel", [
    (1, (17,), (3,)),
    (2, (9, 8), (3, 3)),
    (2, (10, 7), (3, 2)),
    (3, (6, 5, 7), (3, 3, 3)),
    (3, (5, 7, 6), (2, 3, 1)),
])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("padding", ["none", "symmetric", "asymmetric", "wide"])
def test_grouped_matches_reference(nd, x_size, kernel, stride, dilation, padding):
    rng = np.random.default_rng(hash((nd, x_size, stride, dilation, padding)) % 2**32)
    if padding == "none":
        lo = hi = (0,) * nd
    elif padding == "symmetric":
        lo = hi = tuple(dilation * (k - 1) // 2 for k in kernel)
    elif padding == "asymmetric":
        lo, hi = tuple((i % 3) for i in range(nd)), tuple(((i + 2) % 3) for i in range(nd))
    else:   # wider than the kernel's reach: the flipped-kernel padding goes negative
        lo, hi = (dilation * (max(kernel) - 1) + 1,) * nd, (1,) * nd
    stride_t, dilation_t = (stride,) * nd, (dilation,) * nd
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation_t)]
    x_size = tuple(max(n, e - a - b) for n, e, a, b in zip(x_size, span, lo, hi))
    _check_grouped(rng, 2, 6, 9, 3, x_size, kernel, stride_t, dilation_t, lo, hi)


@pytest.mark.parametrize("c_in, c_out, groups", [
    (4, 4, 2),      # 2 in, 2 out per group
    (16, 8, 2),     # 8 in, 4 out
    (8, 24, 4),     # 2 in, 6 out
    (20, 36, 2),    # 10 in, 18 out: 8- and 4-output blocks plus single outputs
    (64, 64, 2),    # 32 per group, the largest that grouped takes
])
@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_channel_counts(c_in, c_out, groups, stride):
    rng = np.random.default_rng(c_in * 100 + c_out + stride)
    _check_grouped(rng, 3, c_in, c_out, groups, (11, 9), (3, 3), (stride,) * 2, (1, 1), (1, 0), (2, 1))


def test_grouped_float16_computes_in_float32():
    rng = np.random.default_rng(5)
    _check_grouped(rng, 2, 8, 8, 2, (7, 6), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), dtypes=(np.float16,))


def test_grouped_results_do_not_depend_on_threads():
    numba = pytest.importorskip("numba")
    g = geometry((5, 16, 12, 11), (16, 4, 3, 3), padding=1, groups=4)
    rng = np.random.default_rng(11)
    x, w, gy = (rng.standard_normal(s).astype(np.float32) for s in (g.x_shape, g.w_shape, g.y_shape))
    e = CPUEngine()
    results = []
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            with e.force("grouped"):
                results.append([e.forward(x, w, g), e.backward_input(gy, w, g), e.backward_weight(x, gy, g)])
    finally:
        numba.set_num_threads(before)
    for a, b in zip(results[0], results[-1]):
        np.testing.assert_array_equal(a, b)


def test_grouped_supports_only_small_groups():
    e = CPUEngine()
    grouped = geometry((8, 256, 28, 28), (256, 8, 3, 3), padding=1, groups=32)
    plain = geometry((2, 8, 9, 9), (8, 8, 3, 3), padding=1)
    depthwise = geometry((2, 8, 9, 9), (16, 1, 3, 3), padding=1, groups=8)
    wide = geometry((2, 128, 9, 9), (128, 64, 3, 3), padding=1, groups=2)      # 64 per group
    for op in OPS:
        assert e.supports("grouped", op, grouped)
        assert not e.supports("grouped", op, plain)
        assert not e.supports("grouped", op, depthwise)
        assert not e.supports("grouped", op, wide)
    assert not CPUEngine(workspace_limit=1 << 10).supports("grouped", "forward", grouped)


def test_untuned_choice_takes_grouped_for_small_groups():
    e = CPUEngine()
    bench_row = geometry((8, 256, 28, 28), (256, 8, 3, 3), padding=1, groups=32)   # c2d_grouped32
    strided = geometry((4, 64, 16, 16), (64, 16, 3, 3), stride=2, padding=1, groups=4)
    volume = geometry((1, 32, 8, 8, 8), (32, 4, 3, 3, 3), padding=1, groups=8)
    pointwise = geometry((2, 64, 14, 14), (64, 16, 1, 1), groups=4)          # one GEMM per sample wins
    for op in OPS:
        for g in (bench_row, strided, volume):
            assert e.choose(op, g, np.float32) == "grouped", (op, g)
        assert e.choose(op, pointwise, np.float32) != "grouped"
    depthwise = geometry((2, 4, 9, 9), (8, 1, 3, 3), padding=1, groups=4)
    assert e.choose("forward", depthwise, np.float32) == "depthwise"


if given is not None:
    @st.composite
    def grouped_cases(draw):
        """A random geometry with 2-4 input and 1-5 output channels per group."""
        nd = draw(st.integers(1, 3))
        groups = draw(st.integers(2, 3))
        cg, og = draw(st.integers(2, 4)), draw(st.integers(1, 5))
        kmax = 3 if nd < 3 else 2

        def per_dim(lo, hi):
            return tuple(draw(st.integers(lo, hi)) for _ in range(nd))
        kernel, stride, dilation = per_dim(1, kmax), per_dim(1, 3), per_dim(1, 2)
        lo, hi = per_dim(0, 3), per_dim(0, 3)
        smax = 7 if nd < 3 else 5
        x_size = []
        for k, d, a, b in zip(kernel, dilation, lo, hi):
            least = max(1, d * (k - 1) + 1 - a - b)
            x_size.append(draw(st.integers(least, max(least, smax))))
        return dict(batch=draw(st.integers(1, 2)), c_in=cg * groups, c_out=og * groups, groups=groups,
                    x_size=tuple(x_size), kernel=kernel, stride=stride, dilation=dilation, lo=lo, hi=hi,
                    seed=draw(st.integers(0, 2**31 - 1)))

    @given(grouped_cases())
    @settings(max_examples=150)
    def test_grouped_random_geometries(case):
        case = dict(case)
        rng = np.random.default_rng(case.pop("seed"))
        _check_grouped(rng, **case)
else:
    @pytest.mark.skip(reason="needs hypothesis")
    def test_grouped_random_geometries():
        pass
