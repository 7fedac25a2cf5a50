"""Property tests: ndconv against PyTorch CPU (float64 autograd) on random geometries.

Every example checks the forward result and all three gradients (input, weight,
bias) of one call, for convolution or transposed convolution, over dims 1-3,
stride/dilation 1-3, int / per-dim / asymmetric (lo, hi) / 'same' / 'valid'
padding, every padding mode, groups (plain, depthwise, depth multiplier),
output_padding up to max(stride, dilation) - 1, output_size (with and without the
(N, C) dims), batch 0, unbatched input, channels-last data formats, and caller
arrays that are non-contiguous (strided slices, Fortran order, moved axes) or
broadcast (stride 0).  Caller arrays are made read-only, so any write into them by
the engine fails the test.

PyTorch has no asymmetric padding: convolution pads explicitly with ``F.pad`` and
convolves with padding 0; transposed convolution runs with the smaller of the two
pads and a compensating output_padding, then slices.  The torch side always runs
in float64 on the very values ndconv received; float32 and float16 results are
compared with tolerances scaled to the result's magnitude.
"""
from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ndconv  # noqa: E402

CHANNELS_LAST = {1: "NLC", 2: "NHWC", 3: "NDHWC"}
CHANNELS_FIRST = {1: "NCL", 2: "NCHW", 3: "NCDHW"}
TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TORCH_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
NDCONV_CONV = {1: ndconv.conv1d, 2: ndconv.conv2d, 3: ndconv.conv3d}
NDCONV_CONVT = {1: ndconv.conv_transpose1d, 2: ndconv.conv_transpose2d, 3: ndconv.conv_transpose3d}
TOL = {np.float64: 1e-10, np.float32: 2e-5, np.float16: 2e-2}


# ------------------------------------------------------------------ strategies

def _per_dim(draw, nd, lo, hi):
    return tuple(draw(st.integers(lo, hi)) for _ in range(nd))


@st.composite
def channels(draw):
    """(groups, c_in, c_out): plain, grouped, depthwise, depthwise with multiplier."""
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise", "multiplier"]))
    if kind == "plain":
        return 1, draw(st.integers(1, 3)), draw(st.integers(1, 3))
    g = draw(st.integers(2, 3))
    if kind == "grouped":
        return g, g * draw(st.integers(1, 2)), g * draw(st.integers(1, 2))
    if kind == "depthwise":
        return g, g, g
    return g, g, g * draw(st.integers(2, 3))


@st.composite
def layouts(draw, nd):
    """How the caller presents its arrays: batch (None = unbatched), format, memory."""
    batch = draw(st.sampled_from([None, None, 0, 1, 1, 2, 2, 2]))
    fmt = draw(st.sampled_from(["default", "first", "last"]))
    mem = draw(st.sampled_from(["contiguous", "sliced", "fortran", "broadcast"]))
    wmem = draw(st.sampled_from(["contiguous", "contiguous", "sliced", "fortran", "broadcast"]))
    dtype = draw(st.sampled_from([np.float64, np.float64, np.float32]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(batch=batch, fmt=fmt, mem=mem, wmem=wmem, dtype=dtype, seed=seed)


@st.composite
def conv_cases(draw):
    nd = draw(st.integers(1, 3))
    groups, c_in, c_out = draw(channels())
    kmax = 3 if nd < 3 else 2
    kernel = _per_dim(draw, nd, 1, kmax)
    dilation = _per_dim(draw, nd, 1, 3)
    kind = draw(st.sampled_from(["int", "tuple", "pairs", "pairs", "same", "valid"]))
    stride = (1,) * nd if kind == "same" else _per_dim(draw, nd, 1, 3)
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    if kind == "int":
        p = draw(st.integers(0, 2))
        padding, lo, hi = p, (p,) * nd, (p,) * nd
    elif kind == "tuple":
        lo = hi = _per_dim(draw, nd, 0, 2)
        padding = lo
    elif kind == "pairs":
        lo, hi = _per_dim(draw, nd, 0, 3), _per_dim(draw, nd, 0, 3)
        padding = [(a, b) for a, b in zip(lo, hi)]
    elif kind == "same":
        lo = tuple((e - 1) // 2 for e in span)
        hi = tuple(e - 1 - a for e, a in zip(span, lo))
        padding = "same"
    else:
        lo = hi = (0,) * nd
        padding = "valid"
    smax = 6 if nd < 3 else 4
    x_size = []
    for e, a, b in zip(span, lo, hi):
        least = max(1, e - a - b)
        if mode == "reflect":
            least = max(least, a + 1, b + 1)
        elif mode == "circular":
            least = max(least, a, b)
        x_size.append(draw(st.integers(least, max(least, smax))))
    return dict(nd=nd, groups=groups, c_in=c_in, c_out=c_out, kernel=kernel, stride=stride,
                dilation=dilation, padding=padding, lo=lo, hi=hi, mode=mode, x_size=tuple(x_size),
                bias=draw(st.booleans()), layout=draw(layouts(nd)))


@st.composite
def transpose_cases(draw):
    nd = draw(st.integers(1, 3))
    groups, c_in, c_out = draw(channels())
    kmax = 3 if nd < 3 else 2
    kernel = _per_dim(draw, nd, 1, kmax)
    stride = _per_dim(draw, nd, 1, 3)
    dilation = _per_dim(draw, nd, 1, 3)
    kind = draw(st.sampled_from(["int", "tuple", "pairs"]))
    if kind == "int":
        p = draw(st.integers(0, 2))
        padding, lo, hi = p, (p,) * nd, (p,) * nd
    elif kind == "tuple":
        lo = hi = _per_dim(draw, nd, 0, 2)
        padding = lo
    else:
        lo, hi = _per_dim(draw, nd, 0, 3), _per_dim(draw, nd, 0, 3)
        padding = [(a, b) for a, b in zip(lo, hi)]
    ymax = 4 if nd < 3 else 3
    y_size, smallest = [], []
    for k, s, d, a, b in zip(kernel, stride, dilation, lo, hi):
        full_one = d * (k - 1) + 1
        # the smallest input that leaves at least one output position at op = 0
        least = max(1, -(-(a + b - full_one + 1) // s) + 1)
        n = draw(st.integers(least, max(least, ymax)))
        y_size.append(n)
        smallest.append((n - 1) * s - a - b + full_one)
    size_kind = draw(st.sampled_from(["none", "none", "output_padding", "output_size", "output_size_nc"]))
    output_padding, output_size = (0,) * nd, None
    if size_kind == "output_padding":
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    elif size_kind.startswith("output_size"):
        output_size = tuple(m + draw(st.integers(0, s - 1)) for m, s in zip(smallest, stride))
    return dict(nd=nd, groups=groups, c_in=c_in, c_out=c_out, kernel=kernel, stride=stride,
                dilation=dilation, padding=padding, lo=lo, hi=hi, y_size=tuple(y_size),
                output_padding=output_padding, output_size=output_size, size_kind=size_kind,
                bias=draw(st.booleans()), layout=draw(layouts(nd)))


# ------------------------------------------------------------------ array presentation

def _memory(rng, a, mem):
    """``a``'s values in an array with the given memory presentation (read-only)."""
    if mem == "sliced":
        # every other element of a bigger buffer, and negative strides along the first axis
        big = np.zeros(tuple(2 * n + 1 for n in a.shape), dtype=a.dtype)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a[::-1] if a.ndim else a
        a = view[::-1] if a.ndim else view
    elif mem == "fortran":
        a = np.asfortranarray(a)
    elif mem == "broadcast" and a.size:
        axis = int(rng.integers(a.ndim))
        a = np.broadcast_to(a.take([0], axis=axis), a.shape)
    if a.flags.writeable:
        a.flags.writeable = False
    return a


def _present(rng, canonical, layout, mem, is_weight=False):
    """The caller's array (layout, dtype, memory presentation) made from ``canonical``, and
    the canonical float64 values it really holds (broadcasting collapses one axis)."""
    a = canonical if is_weight else _to_caller(canonical, layout)
    a = _memory(rng, a.astype(layout["dtype"]), mem)
    c = np.array(a, dtype=np.float64)
    return a, (c if is_weight else _from_caller(c, layout))


def _to_caller(canonical, layout):
    a = canonical
    if layout["fmt"] == "last":
        a = np.moveaxis(a, 1, -1)
    if layout["batch"] is None:
        a = a[0]
    return a


def _from_caller(a, layout):
    if layout["batch"] is None:
        a = a[None]
    if layout["fmt"] == "last":
        a = np.moveaxis(a, -1, 1)
    return a


def _fmt_arg(layout, nd):
    return {"default": None, "first": CHANNELS_FIRST[nd], "last": CHANNELS_LAST[nd]}[layout["fmt"]]


def _close(actual, expected, dtype, what):
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == np.dtype(dtype), f"{what}: dtype {actual.dtype} != {np.dtype(dtype)}"
    tol = TOL[dtype]
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tol, atol=tol * scale,
                               err_msg=what)


def _t(a, grad=True):
    return torch.tensor(np.ascontiguousarray(a), dtype=torch.float64, requires_grad=grad)


# ------------------------------------------------------------------ convolution

def _torch_conv(c, xt, wt, bt):
    nd = c["nd"]
    if c["padding"] == "same" and c["mode"] == "zeros":
        return TORCH_CONV[nd](xt, wt, bt, 1, "same", c["dilation"], c["groups"])
    # F.pad takes (lo, hi) pairs starting from the last dim
    pads = [v for a, b in zip(reversed(c["lo"]), reversed(c["hi"])) for v in (a, b)]
    mode = "constant" if c["mode"] == "zeros" else c["mode"]
    return TORCH_CONV[nd](F.pad(xt, pads, mode=mode), wt, bt, c["stride"], 0, c["dilation"], c["groups"])


def run_conv_case(c):
    nd, lay = c["nd"], c["layout"]
    rng = np.random.default_rng(lay["seed"])
    n = 1 if lay["batch"] is None else lay["batch"]
    x0 = rng.standard_normal((n, c["c_in"]) + c["x_size"])
    w0 = rng.standard_normal((c["c_out"], c["c_in"] // c["groups"]) + c["kernel"])
    b0 = rng.standard_normal(c["c_out"])
    x, xc = _present(rng, x0, lay, lay["mem"])
    w, wc = _present(rng, w0, lay, lay["wmem"], is_weight=True)
    b, bc = _present(rng, b0, lay, "contiguous", is_weight=True) if c["bias"] else (None, None)
    dtype, fmt = lay["dtype"], _fmt_arg(lay, nd)
    x_before, w_before = np.array(x), np.array(w)

    xt, wt = _t(xc), _t(wc)
    bt = _t(bc) if c["bias"] else None
    yt = _torch_conv(c, xt, wt, bt)
    # the output gradient, rounded to dtype so both sides differentiate the same values
    g0 = rng.standard_normal(tuple(yt.shape)).astype(dtype).astype(np.float64)
    yt.backward(torch.from_numpy(g0))

    y = NDCONV_CONV[nd](x, w, b, c["stride"], c["padding"], c["dilation"], c["groups"],
                        padding_mode=c["mode"], data_format=fmt)
    g = _memory(rng, _to_caller(g0, lay).astype(dtype), lay["mem"])
    gx, gw, gb = ndconv.conv_backward(g, x, w, c["stride"], c["padding"], c["dilation"],
                                      c["groups"], padding_mode=c["mode"], data_format=fmt)
    g0 = _from_caller(np.array(g, dtype=np.float64), lay)  # a broadcast g collapsed an axis
    if lay["mem"] == "broadcast":
        xt.grad = wt.grad = None
        _torch_conv(c, xt, wt, None).backward(torch.from_numpy(np.ascontiguousarray(g0)))
    _close(y, _to_caller(yt.detach().numpy(), lay), dtype, f"forward {c}")
    _close(gx, _to_caller(xt.grad.numpy(), lay), dtype, f"grad_input {c}")
    _close(gw, wt.grad.numpy(), dtype, f"grad_weight {c}")
    _close(gb, g0.sum(axis=(0,) + tuple(range(2, g0.ndim))), dtype, f"grad_bias {c}")
    if bt is not None and lay["mem"] != "broadcast":
        _close(gb, bt.grad.numpy(), dtype, f"grad_bias (torch) {c}")
    np.testing.assert_array_equal(np.array(x), x_before)
    np.testing.assert_array_equal(np.array(w), w_before)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@given(conv_cases())
@settings(max_examples=400)
def test_conv_matches_torch(c):
    run_conv_case(c)


# ------------------------------------------------------------------ transposed convolution

def _torch_transpose(c, yt, wt, bt):
    """Transposed convolution in torch; returns (out, weight tensor, bias tensor) whose
    .grad hold the gradients after backward.  Asymmetric padding: torch runs with the
    smaller pad of each dim and a compensating output_padding, then the result is sliced."""
    nd, lo, hi, s = c["nd"], c["lo"], c["hi"], c["stride"]
    if c["output_size"] is not None and lo == hi:
        # torch's module API turns output_size into output_padding itself (padding symmetric)
        mod = getattr(torch.nn, f"ConvTranspose{nd}d")(
            c["c_in"], c["c_out"], c["kernel"], s, lo, 0, c["groups"], bias=bt is not None,
            dilation=c["dilation"], dtype=torch.float64)
        mod.weight = torch.nn.Parameter(wt.detach().clone())
        if bt is not None:
            mod.bias = torch.nn.Parameter(bt.detach().clone())
        size = list(c["output_size"])
        if c["size_kind"] == "output_size_nc":
            size = [yt.shape[0], c["c_out"]] + size
        return mod(yt, output_size=size), mod.weight, mod.bias
    op = c["output_padding"]
    if c["output_size"] is not None:
        smallest = [(n - 1) * st_ - a - b + d * (k - 1) + 1 for n, st_, a, b, d, k in
                    zip(c["y_size"], s, lo, hi, c["dilation"], c["kernel"])]
        op = tuple(o - m for o, m in zip(c["output_size"], smallest))
    if lo == hi:
        return TORCH_CONVT[nd](yt, wt, bt, s, lo, op, c["groups"], c["dilation"]), wt, bt
    p = tuple(min(a, b) for a, b in zip(lo, hi))
    op2 = tuple(max(0, o - (b - m)) for o, b, m in zip(op, hi, p))
    full = TORCH_CONVT[nd](yt, wt, bt, s, p, op2, c["groups"], c["dilation"])
    out_size = [(n - 1) * st_ - a - b + d * (k - 1) + 1 + o for n, st_, a, b, d, k, o in
                zip(c["y_size"], s, lo, hi, c["dilation"], c["kernel"], op)]
    sl = tuple(slice(a - m, a - m + o) for a, m, o in zip(lo, p, out_size))
    return full[(slice(None), slice(None)) + sl], wt, bt


def run_transpose_case(c):
    nd, lay = c["nd"], c["layout"]
    rng = np.random.default_rng(lay["seed"])
    n = 1 if lay["batch"] is None else lay["batch"]
    y0 = rng.standard_normal((n, c["c_in"]) + c["y_size"])
    w0 = rng.standard_normal((c["c_in"], c["c_out"] // c["groups"]) + c["kernel"])
    b0 = rng.standard_normal(c["c_out"])
    y, yc = _present(rng, y0, lay, lay["mem"])
    w, wc = _present(rng, w0, lay, lay["wmem"], is_weight=True)
    b, bc = _present(rng, b0, lay, "contiguous", is_weight=True) if c["bias"] else (None, None)
    dtype, fmt = lay["dtype"], _fmt_arg(lay, nd)
    y_before, w_before = np.array(y), np.array(w)

    yt = _t(yc)
    outt, wt, bt = _torch_transpose(c, yt, _t(wc), _t(bc) if c["bias"] else None)
    g0 = rng.standard_normal(tuple(outt.shape)).astype(dtype).astype(np.float64)
    outt.backward(torch.from_numpy(g0))

    size = c["output_size"]
    if size is not None and c["size_kind"] == "output_size_nc":
        size = (n, c["c_out"]) + tuple(size)
    out = NDCONV_CONVT[nd](y, w, b, c["stride"], c["padding"], c["output_padding"], c["groups"],
                           c["dilation"], output_size=size, data_format=fmt)
    g = _memory(rng, _to_caller(g0, lay).astype(dtype), "sliced" if lay["mem"] == "sliced" else "contiguous")
    gy, gw, gb = ndconv.conv_backward(g, y, w, c["stride"], c["padding"], c["dilation"], c["groups"],
                                      transposed=True, output_padding=c["output_padding"],
                                      output_size=size, data_format=fmt)
    _close(out, _to_caller(outt.detach().numpy(), lay), dtype, f"forward {c}")
    _close(gy, _to_caller(yt.grad.numpy(), lay), dtype, f"grad_input {c}")
    _close(gw, wt.grad.numpy(), dtype, f"grad_weight {c}")
    _close(gb, g0.sum(axis=(0,) + tuple(range(2, g0.ndim))), dtype, f"grad_bias {c}")
    if bt is not None:
        _close(gb, bt.grad.numpy(), dtype, f"grad_bias (torch) {c}")
    np.testing.assert_array_equal(np.array(y), y_before)
    np.testing.assert_array_equal(np.array(w), w_before)


@given(transpose_cases())
@settings(max_examples=400)
def test_conv_transpose_matches_torch(c):
    run_transpose_case(c)


# ------------------------------------------------------------------ float16

def _half(case):
    case["layout"]["dtype"] = np.float16
    return case


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@given(conv_cases().map(_half))
@settings(max_examples=30)
def test_conv_float16_matches_torch(c):
    """float16 in and out (accumulated in float32): close to float64 on the same values."""
    run_conv_case(c)


@given(transpose_cases().map(_half))
@settings(max_examples=30)
def test_conv_transpose_float16_matches_torch(c):
    run_transpose_case(c)
