"""The ``depthwise`` CPU algorithm: the sliding kernel (cpu_depthwise.slide) against NumPy,
and the algorithm against the float64 loops."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ndconv
from ndconv.engine import cpu_depthwise as dw
from ndconv.engine.cpu import CPUEngine
from strategies import at_thread_counts

pytestmark = pytest.mark.skipif(not dw.AVAILABLE, reason="numba not installed")
rng = np.random.default_rng(17)


def geometry(x_shape, w_shape, **kw):
    return ndconv.conv_geometry(x_shape, w_shape, None, **kw)[0]


def _slide_caller(nv):
    from numba import njit

    @njit
    def call(out, o, src, s_off, toff, w, w_off, n, accumulate):
        dw.slide(nv, out, o, src, s_off, toff, w, w_off, n, accumulate)
    return call


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nv", dw.SLIDE_VECTORS)
@pytest.mark.parametrize("accumulate", [0, 1])
def test_slide_is_a_shifted_multiply_add_for_every_tail(dtype, nv, accumulate):
    """out[o + i] (+)= sum_t w[w_off + t] * src[s_off + toff[t] + i] for every length up to
    two blocks and a vector past them (every tail of whole and partial vectors); nothing
    outside out[o:o + n] is written."""
    call = _slide_caller(nv)
    width = dw.VECTOR_BYTES // np.dtype(dtype).itemsize
    toff = np.array([0, 3, 17, 5, 40], np.int64)
    o, s_off, w_off = 3, 4, 2
    for n in range(2 * nv * width + width + 2):
        # src is readable SLACK - 1 elements past the last one the sum uses
        src = rng.standard_normal(s_off + toff.max() + n + dw.SLACK - 1).astype(dtype)
        w = rng.standard_normal(w_off + len(toff) + 3).astype(dtype)
        out = rng.standard_normal(o + n + 5).astype(dtype)
        want = out.copy()
        total = sum(w[w_off + t].astype(np.float64) * src[s_off + d:s_off + d + n] for t, d in enumerate(toff))
        want[o:o + n] = total + (want[o:o + n] if accumulate else 0)
        got = out.copy()
        call(got, o, src, s_off, toff, w, w_off, n, accumulate)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"n={n}")
        np.testing.assert_array_equal(got[:o], out[:o])
        np.testing.assert_array_equal(got[o + n:], out[o + n:])


def test_slide_with_no_taps_writes_zeros():
    call = _slide_caller(dw.SLIDE_VECTORS[0])
    out = np.ones(40)
    call(out, 1, np.ones(64), 0, np.zeros(0, np.int64), np.ones(1), 0, 37, 0)
    np.testing.assert_array_equal(out, [1.0] + [0.0] * 37 + [1.0, 1.0])


@st.composite
def depthwise_cases(draw):
    """Depthwise geometries: 1-3-D, kernel 1-5 (long 1-D kernels), stride 1 (mostly) or 2,
    dilation 1-3, asymmetric padding, channel multiplier 1-3; rows from a few outputs to
    several blocks of the kernel."""
    nd = draw(st.integers(1, 3))
    kmax = {1: 33, 2: 5, 3: 3}[nd]
    kernel = tuple(draw(st.lists(st.integers(1, kmax), min_size=nd, max_size=nd)))
    stride = tuple(draw(st.lists(st.sampled_from([1, 1, 1, 2]), min_size=nd, max_size=nd)))
    dilation = tuple(draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)))
    lo = tuple(draw(st.integers(0, d * (k - 1) + 1)) for k, d in zip(kernel, dilation))
    hi = tuple(draw(st.integers(0, d * (k - 1) + 1)) for k, d in zip(kernel, dilation))
    last = draw(st.one_of(st.integers(0, 20), st.integers(180, 420))) if nd == 1 else draw(st.integers(0, 20))
    size = tuple(max(1, d * (k - 1) + 1 - l - h) + (last if i == nd - 1 else draw(st.integers(0, 6)))
                 for i, (k, d, l, h) in enumerate(zip(kernel, dilation, lo, hi)))
    channels = draw(st.integers(2, 5))
    return dict(batch=draw(st.integers(1, 2)), channels=channels, mult=draw(st.integers(1, 3)), kernel=kernel,
                stride=stride, dilation=dilation, padding=tuple(zip(lo, hi)), size=size)


def check_depthwise(c, dtypes=(np.float64, np.float32)):
    import reference as ref
    g = geometry((c["batch"], c["channels"]) + c["size"], (c["channels"] * c["mult"], 1) + c["kernel"],
                 stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["channels"])
    args = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["channels"])
    x, w, gy = (rng.standard_normal(s) for s in (g.x_shape, g.w_shape, g.y_shape))
    expected = {"forward": ref.conv(x, w, None, **args),
                "backward_input": ref.conv_grad_input(gy, w, c["size"], **args),
                "backward_weight": ref.conv_grad_weight(x, gy, w.shape, **args)}
    operands = {"forward": (x, w), "backward_input": (gy, w), "backward_weight": (x, gy)}
    e = CPUEngine()
    for op, want in expected.items():
        assert e.supports("depthwise", op, g, 8)
        for dtype in dtypes:
            tol = 1e-10 if dtype == np.float64 else 1e-4
            with e.force("depthwise"):
                got = getattr(e, op)(*(v.astype(dtype) for v in operands[op]), g)
            assert got.dtype == dtype and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()),
                                       err_msg=f"{op} {dtype.__name__} {g}")


@settings(max_examples=80, deadline=None)
@given(c=depthwise_cases())
def test_depthwise_matches_reference_on_drawn_geometries(c):
    """Forced ``depthwise``: forward, input gradient and weight gradient, float64 and float32."""
    check_depthwise(c)


@pytest.mark.parametrize("size,kernel,padding", [
    ((1, 300), (1, 31), ((0, 0), (15, 15))),          # 2-D planes of one row: the per-row pass
    ((3, 1, 200), (3, 1, 9), ((1, 1), (0, 0), (4, 4))),
    ((2048,), (31,), ((15, 15),)),                   # the benchmark's row length
    ((9, 70), (3, 7), ((0, 2), (6, 0))),             # several rows: the flat pass, asymmetric padding
    ((1, 2), (1, 2), ((0, 1), (0, 0))),               # gy has 2 rows, the input gradient reads only one
    ((2, 3, 5), (1, 1, 3), ((0, 1), (0, 2), (1, 1))),
])
def test_depthwise_row_and_flat_passes(size, kernel, padding):
    check_depthwise(dict(batch=2, channels=3, mult=2, kernel=kernel, stride=(1,) * len(size),
                         dilation=(1,) * len(size), padding=padding, size=size))


@pytest.mark.parametrize("size,kernel,padding", [((4, 1000), (1, 31), 0), ((2000,), (31,), 15),
                                                 ((9, 33), (3, 3), 1)])
def test_depthwise_does_not_depend_on_threads(size, kernel, padding):
    g = geometry((2, 6) + size, (12, 1) + kernel, padding=padding, groups=6)
    x = rng.standard_normal(g.x_shape).astype(np.float32)
    w = rng.standard_normal(g.w_shape).astype(np.float32)
    gy = rng.standard_normal(g.y_shape).astype(np.float32)
    e = CPUEngine()

    def run():
        with e.force("depthwise"):
            return e.forward(x, w, g), e.backward_input(gy, w, g), e.backward_weight(x, gy, g)
    results = at_thread_counts(run)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def _align_caller():
    from numba import njit

    @njit
    def call(out, o, src, s_off, w, w_off, taps, n, accumulate, ahead):
        dw.align_slide(out, o, src, s_off, w, w_off, taps, n, accumulate, ahead)
    return call


def _aligned(size, dtype):
    # size elements from a 64-byte boundary
    buf = np.empty(size + dw.VECTOR_BYTES, dtype)
    skip = -buf.ctypes.data % dw.VECTOR_BYTES // buf.itemsize
    return buf[skip:skip + size]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("accumulate", [0, 1])
def test_align_slide_is_a_shifted_multiply_add(dtype, accumulate):
    """out[o + i] (+)= sum_j w[w_off + j] * src[s_off + i + j] for whole vectors: every
    number of vectors through blocks of ALIGN_R, 4 and 1, tap counts that end a row of
    taps partway and exactly (2-4 rows); src holds exactly the elements the sum reads, and
    nothing outside out[o:o + LANES*n] is written."""
    call = _align_caller()
    lanes = dw.VECTOR_BYTES // np.dtype(dtype).itemsize
    o, w_off = 5, 3
    for taps in (lanes + 1, 2 * lanes - 1, 2 * lanes, 2 * lanes + 3, 3 * lanes, 4 * lanes - 2, 4 * lanes):
        for n in list(range(0, 7)) + [dw.ALIGN_R - 1, dw.ALIGN_R, dw.ALIGN_R + 5, 2 * dw.ALIGN_R + 4]:
            size = lanes * n
            src = _aligned(lanes + size + taps - 1, dtype)        # s_off = lanes, on a boundary
            src[:] = rng.standard_normal(src.shape)
            w = rng.standard_normal(w_off + taps + 2).astype(dtype)
            out = rng.standard_normal(o + size + 7).astype(dtype)
            want = out.astype(np.float64)
            total = sum(w[w_off + j].astype(np.float64) * src[lanes + j:lanes + j + size] for j in range(taps))
            want[o:o + size] = total + (want[o:o + size] if accumulate else 0)
            got = out.copy()
            call(got, o, src, lanes, w, w_off, taps, n, accumulate, src)
            tol = 2e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"taps={taps} n={n}")
            np.testing.assert_array_equal(got[:o], out[:o])
            np.testing.assert_array_equal(got[o + size:], out[o + size:])


@pytest.mark.parametrize("channels,mult", [(2, 1), (3, 2), (16, 1), (17, 1), (20, 3)])
@pytest.mark.parametrize("kernel,padding", [(31, (15, 15)), (24, (0, 23)), (64, (40, 3)), (20, (19, 0)),
                                            (48, (7, 7))])
def test_depthwise_aligned_path(channels, mult, kernel, padding):
    """1-D kernels that slide_row hands to align_slide (use_align for float32 or float64 rows),
    forward and input gradient (a gather over the multiplier) against the float64 loops:
    odd, even, < 16 and not a multiple of 16 channels, asymmetric padding, rows that
    end partway through a vector."""
    assert any(dw.use_align(kernel, kernel, dw.VECTOR_BYTES // s) for s in (4, 8))
    for size in (kernel + 37, 2 * kernel + 129):
        check_depthwise(dict(batch=2, channels=channels, mult=mult, kernel=(kernel,), stride=(1,), dilation=(1,),
                             padding=(padding,), size=(size,)))


def test_depthwise_aligned_path_leaves_dilation_to_slide():
    """Dilated long kernels keep the channels-first kernel (and stay right)."""
    assert not dw.use_align(31, 61, 16)
    check_depthwise(dict(batch=1, channels=5, mult=2, kernel=(31,), stride=(1,), dilation=(2,),
                         padding=((20, 40),), size=(300,)))


def test_depthwise_aligned_path_keeps_non_finite_values_in_their_windows():
    """An inf in x reaches only the outputs whose window holds it (no zero-padded taps
    multiply it into its neighbours)."""
    g = geometry((1, 2, 200), (2, 1, 31), padding=15, groups=2)
    x = np.ones(g.x_shape, np.float32)
    x[0, 1, 100] = np.inf
    e = CPUEngine()
    with e.force("depthwise"):
        y = e.forward(x, np.ones(g.w_shape, np.float32), g)
    assert np.isinf(y[0, 1, 85:116]).all() and np.isfinite(y[0, 1, :85]).all() and np.isfinite(y[0, 1, 116:]).all()
    assert np.isfinite(y[0, 0]).all()
