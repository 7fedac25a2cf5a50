"""Edge cases from SPEC.md and the layout/format/dtype surface of the functional API.

PyTorch's output_padding sample, asymmetric 'same', down-then-up round trips with
output_size, grouped == per-group concatenated, channels 0, batch 0, layouts
(channels-last, unbatched) equal to the canonical call, Paddle's padding forms,
float16 accumulation, and the workspace limit splitting work without changing
results.
"""
from __future__ import annotations

import numpy as np
import pytest

import ndconv
import reference as ref

CONV = {1: ndconv.conv1d, 2: ndconv.conv2d, 3: ndconv.conv3d}
CONVT = {1: ndconv.conv_transpose1d, 2: ndconv.conv_transpose2d, 3: ndconv.conv_transpose3d}
FORMATS = {1: ("NCL", "NLC"), 2: ("NCHW", "NHWC"), 3: ("NCDHW", "NDHWC")}


def _close(a, b, what=""):
    assert a.shape == b.shape, f"{what}: {a.shape} != {b.shape}"
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=what)


# ------------------------------------------------------------------ PyTorch's sample

SAMPLE = dict(stride=(3, 2, 1), padding=(1, 2, 3), output_padding=(2, 3, 1), groups=2, dilation=4)


def _sample_arrays():
    rng = np.random.default_rng(42)
    return (rng.standard_normal((2, 2, 4, 4, 4)), rng.standard_normal((2, 2, 4, 5, 6)),
            rng.standard_normal(4))


def test_output_padding_below_dilation_sample_vs_reference():
    """output_padding >= stride but < dilation: (2, 3, 1) with stride (3, 2, 1), dilation 4."""
    y, w, b = _sample_arrays()
    out = ndconv.conv_transpose3d(y, w, b, **SAMPLE)
    expected = ref.conv_transpose(y, w, b, SAMPLE["stride"], SAMPLE["padding"], SAMPLE["output_padding"],
                                  SAMPLE["groups"], SAMPLE["dilation"])
    assert out.shape == (2, 4, 22, 22, 19)
    _close(out, expected, "forward")
    g = np.random.default_rng(1).standard_normal(out.shape)
    gy, gw, gb = ndconv.conv_backward(g, y, w, SAMPLE["stride"], SAMPLE["padding"], SAMPLE["dilation"],
                                      SAMPLE["groups"], transposed=True,
                                      output_padding=SAMPLE["output_padding"])
    _close(gy, ref.conv_transpose_grad_input(g, w, y.shape[2:], SAMPLE["stride"], SAMPLE["padding"],
                                             SAMPLE["groups"], SAMPLE["dilation"]), "grad_input")
    _close(gw, ref.conv_transpose_grad_weight(y, g, w.shape, SAMPLE["stride"], SAMPLE["padding"],
                                              SAMPLE["groups"], SAMPLE["dilation"]), "grad_weight")
    _close(gb, g.sum(axis=(0, 2, 3, 4)), "grad_bias")


@pytest.mark.requires_torch
def test_output_padding_below_dilation_sample_vs_torch(torch):
    y, w, b = _sample_arrays()
    yt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (y, w, b))
    outt = torch.nn.functional.conv_transpose3d(yt, wt, bt, **SAMPLE)
    g = np.random.default_rng(2).standard_normal(tuple(outt.shape))
    outt.backward(torch.from_numpy(g))
    out = ndconv.conv_transpose3d(y, w, b, **SAMPLE)
    _close(out, outt.detach().numpy(), "forward")
    grads = ndconv.conv_backward(g, y, w, SAMPLE["stride"], SAMPLE["padding"], SAMPLE["dilation"],
                                 SAMPLE["groups"], transposed=True, output_padding=SAMPLE["output_padding"])
    for mine, t, what in zip(grads, (yt, wt, bt), ("input", "weight", "bias")):
        _close(mine, t.grad.numpy(), f"grad_{what}")


# ------------------------------------------------------------------ 'same'

@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("kernel, dilation", [(4, 1), (2, 3), (2, 1), (3, 2)])
def test_asymmetric_same_is_larger_symmetric_pad_then_slice(nd, kernel, dilation):
    """Odd total padding d(k-1): 'same' puts the extra unit at the end, which equals padding
    symmetrically by the larger half and dropping the first output position."""
    rng = np.random.default_rng(nd * 10 + kernel)
    x = rng.standard_normal((2, 2) + (6,) * nd)
    w = rng.standard_normal((3, 2) + (kernel,) * nd)
    same = CONV[nd](x, w, padding="same", dilation=dilation)
    assert same.shape == x.shape[:1] + (3,) + x.shape[2:]
    total = dilation * (kernel - 1)
    big = CONV[nd](x, w, padding=total - total // 2, dilation=dilation)
    drop = total % 2      # the larger symmetric pad adds one position at the front
    _close(same, big[(slice(None), slice(None)) + (slice(drop, drop + 6),) * nd])
    # and the explicit (lo, hi) pairs
    pairs = [(total // 2, total - total // 2)] * nd
    _close(same, CONV[nd](x, w, padding=pairs, dilation=dilation))
    gx, gw, gb = ndconv.conv_backward(np.ones_like(same), x, w, 1, "same", dilation)
    gx2, gw2, gb2 = ndconv.conv_backward(np.ones_like(same), x, w, 1, pairs, dilation)
    _close(gx, gx2)
    _close(gw, gw2)


def test_valid_is_zero_padding():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 2, 7, 6)), rng.standard_normal((3, 2, 3, 2))
    _close(ndconv.conv2d(x, w, padding="valid", stride=2), ndconv.conv2d(x, w, padding=0, stride=2))


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("kernel, stride, padding", [(3, 2, 1), (4, 2, 1), (3, 3, 0), (5, 3, 2), (2, 2, 0)])
def test_down_then_up_round_trip_with_output_size(nd, kernel, stride, padding):
    """conv maps several input sizes to one output size; output_size picks each of them back,
    and the result equals the convolution's input gradient at that size."""
    rng = np.random.default_rng(kernel * 7 + stride)
    w = rng.standard_normal((2, 3) + (kernel,) * nd)
    for n in range(max(1, kernel - 2 * padding), 18):
        x = rng.standard_normal((1, 3) + (n,) * nd)
        y = CONV[nd](x, w, stride=stride, padding=padding)
        for size in ((n,) * nd, (1, 2) + (n,) * nd):
            up = CONVT[nd](y, w, stride=stride, padding=padding, output_size=size)
            assert up.shape == x.shape[:1] + (3,) + x.shape[2:] or up.shape == x.shape, (n, size)
            gx, _, _ = ndconv.conv_backward(y, x, w, stride, padding, needs=("input",))
            _close(up, gx, f"n={n}")


@pytest.mark.requires_torch
def test_round_trip_output_size_matches_torch_module(torch):
    rng = np.random.default_rng(9)
    for stride, kernel, padding, dilation in [(2, 3, 1, 1), (3, 4, 1, 2), (2, 2, 0, 3)]:
        mod = torch.nn.ConvTranspose2d(2, 3, kernel, stride, padding, dilation=dilation,
                                       bias=True, dtype=torch.float64)
        w = mod.weight.detach().numpy()
        b = mod.bias.detach().numpy()
        for n in range(dilation * (kernel - 1) + 1, 14):
            xs = (1, 3, n, n + 1)
            y_size = [(v + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1 for v in xs[2:]]
            y = rng.standard_normal((1, 2) + tuple(y_size))
            want = mod(torch.from_numpy(y), output_size=list(xs[2:])).detach().numpy()
            got = ndconv.conv_transpose2d(y, w, b, stride, padding, dilation=dilation, output_size=xs)
            _close(got, want, f"n={n}")


# ------------------------------------------------------------------ groups, channels 0, batch 0

@pytest.mark.parametrize("nd", [1, 2, 3])
def test_grouped_equals_per_group_concatenated(nd):
    rng = np.random.default_rng(nd)
    G, cg, og = 3, 2, 2
    x = rng.standard_normal((2, G * cg) + (5,) * nd)
    w = rng.standard_normal((G * og, cg) + (2,) * nd)
    kw = dict(stride=2, padding=1)
    y = CONV[nd](x, w, groups=G, **kw)
    parts = [CONV[nd](x[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og], **kw) for g in range(G)]
    _close(y, np.concatenate(parts, axis=1))
    gy = rng.standard_normal(y.shape)
    gx, gw, _ = ndconv.conv_backward(gy, x, w, groups=G, **kw)
    per = [ndconv.conv_backward(gy[:, g * og:(g + 1) * og], x[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og],
                                **kw) for g in range(G)]
    _close(gx, np.concatenate([p[0] for p in per], axis=1))
    _close(gw, np.concatenate([p[1] for p in per], axis=0))
    # transposed: weight (C_in, C_out/G, *k), group g reads input channels g*cg.. and writes g*og..
    wt = rng.standard_normal((G * cg, og) + (3,) * nd)
    t = CONVT[nd](x, wt, groups=G, output_padding=1, **kw)
    tparts = [CONVT[nd](x[:, g * cg:(g + 1) * cg], wt[g * cg:(g + 1) * cg], output_padding=1, **kw)
              for g in range(G)]
    _close(t, np.concatenate(tparts, axis=1))


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_depthwise_with_multiplier_is_per_channel(nd):
    rng = np.random.default_rng(20 + nd)
    C, K = 3, 2
    x = rng.standard_normal((2, C) + (6,) * nd)
    w = rng.standard_normal((C * K, 1) + (3,) * nd)
    y = CONV[nd](x, w, padding=1, groups=C)
    for c in range(C):
        _close(y[:, c * K:(c + 1) * K], CONV[nd](x[:, c:c + 1], w[c * K:(c + 1) * K], padding=1))


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_zero_channels(nd):
    rng = np.random.default_rng(3)
    b = rng.standard_normal(2)
    # no input channels: the output is the bias
    x = np.zeros((2, 0) + (4,) * nd)
    w = np.zeros((2, 0) + (2,) * nd)
    y = CONV[nd](x, w, b)
    assert y.shape == (2, 2) + (3,) * nd
    _close(y, np.broadcast_to(b.reshape((1, 2) + (1,) * nd), y.shape))
    gx, gw, gb = ndconv.conv_backward(np.ones_like(y), x, w)
    assert gx.shape == x.shape and gw.shape == w.shape
    _close(gb, np.full(2, 2.0 * 3 ** nd))
    # no output channels
    x = rng.standard_normal((2, 3) + (4,) * nd)
    w = np.zeros((0, 3) + (2,) * nd)
    y = CONV[nd](x, w)
    assert y.shape == (2, 0) + (3,) * nd
    gx, gw, gb = ndconv.conv_backward(y, x, w)
    _close(gx, np.zeros_like(x))
    assert gw.shape == w.shape and gb.shape == (0,)
    # transposed, no output channels and no input channels
    t = CONVT[nd](x, np.zeros((3, 0) + (2,) * nd), stride=2)
    assert t.shape == (2, 0) + (8,) * nd
    t = CONVT[nd](np.zeros((2, 0) + (4,) * nd), np.zeros((0, 2) + (2,) * nd), b, stride=2)
    _close(t, np.broadcast_to(b.reshape((1, 2) + (1,) * nd), (2, 2) + (8,) * nd))


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_zero_batch(nd, channels_last):
    rng = np.random.default_rng(4)
    fmt = FORMATS[nd][channels_last]
    x = np.zeros((0,) + ((5,) * nd + (2,) if channels_last else (2,) + (5,) * nd))
    w = rng.standard_normal((3, 2) + (2,) * nd)
    b = rng.standard_normal(3)
    y = CONV[nd](x, w, b, stride=2, data_format=fmt)
    expected = (0,) + ((2,) * nd + (3,) if channels_last else (3,) + (2,) * nd)
    assert y.shape == expected
    gx, gw, gb = ndconv.conv_backward(y, x, w, 2, data_format=fmt)
    assert gx.shape == x.shape
    _close(gw, np.zeros_like(w))
    _close(gb, np.zeros(3))
    wt = rng.standard_normal((2, 3) + (2,) * nd)
    t = CONVT[nd](x, wt, b, stride=2, output_padding=1, data_format=fmt)
    assert t.shape == (0,) + ((11,) * nd + (3,) if channels_last else (3,) + (11,) * nd)
    gy, gw, gb = ndconv.conv_backward(t, x, wt, 2, transposed=True, output_padding=1, data_format=fmt)
    assert gy.shape == x.shape
    _close(gw, np.zeros_like(wt))


# ------------------------------------------------------------------ layouts

@pytest.mark.parametrize("nd", [1, 2, 3])
def test_channels_last_and_unbatched_equal_canonical(nd):
    rng = np.random.default_rng(30 + nd)
    x = rng.standard_normal((2, 4) + (5,) * nd)
    w = rng.standard_normal((6, 2) + (3,) * nd)
    b = rng.standard_normal(6)
    kw = dict(stride=2, padding=[(1, 0)] * nd, groups=2)
    y = CONV[nd](x, w, b, **kw)
    g = rng.standard_normal(y.shape)
    grads = ndconv.conv_backward(g, x, w, 2, kw["padding"], 1, 2)
    last = lambda a: np.moveaxis(a, 1, -1)  # noqa: E731
    yl = CONV[nd](last(x), w, b, data_format=FORMATS[nd][1], **kw)
    _close(yl, last(y))
    gl = ndconv.conv_backward(last(g), last(x), w, 2, kw["padding"], 1, 2, data_format=FORMATS[nd][1])
    _close(gl[0], last(grads[0]))
    _close(gl[1], grads[1])
    _close(gl[2], grads[2])
    _close(CONV[nd](x, w, b, data_format=FORMATS[nd][0], **kw), y)
    for i in range(2):
        _close(CONV[nd](x[i], w, b, **kw), y[i])
        _close(CONV[nd](last(x)[i], w, b, data_format=FORMATS[nd][1], **kw), last(y)[i])
        gu = ndconv.conv_backward(g[i], x[i], w, 2, kw["padding"], 1, 2)
        ref_i = ndconv.conv_backward(g[i:i + 1], x[i:i + 1], w, 2, kw["padding"], 1, 2)
        _close(gu[0], ref_i[0][0])
        _close(gu[1], ref_i[1])
    # transposed, channels-last and unbatched
    wt = rng.standard_normal((4, 3) + (2,) * nd)
    t = CONVT[nd](x, wt, None, 2, 1, 1, 2)
    _close(CONVT[nd](last(x), wt, None, 2, 1, 1, 2, data_format=FORMATS[nd][1]), last(t))
    _close(CONVT[nd](x[1], wt, None, 2, 1, 1, 2), t[1])
    gt = rng.standard_normal(t.shape)
    tg = ndconv.conv_backward(gt, x, wt, 2, 1, 1, 2, transposed=True, output_padding=1)
    tgl = ndconv.conv_backward(last(gt), last(x), wt, 2, 1, 1, 2, transposed=True, output_padding=1,
                               data_format=FORMATS[nd][1])
    _close(tgl[0], last(tg[0]))
    _close(tgl[1], tg[1])


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_strided_and_broadcast_arrays_equal_contiguous(nd):
    rng = np.random.default_rng(40 + nd)
    big = rng.standard_normal((3, 5) + (9,) * nd)
    x = big[::2, 1::2][(Ellipsis,) + (slice(None, None, -2),) * nd]     # steps, negative strides
    xc = np.ascontiguousarray(x)
    w = np.asfortranarray(rng.standard_normal((4, 2) + (2,) * nd))
    wc = np.ascontiguousarray(w)
    _close(CONV[nd](x, w, padding=1), CONV[nd](xc, wc, padding=1))
    xb = np.broadcast_to(rng.standard_normal((1, 2) + (1,) * nd), (2, 2) + (4,) * nd)
    wb = np.broadcast_to(rng.standard_normal((3, 1) + (2,) * nd), (3, 2) + (2,) * nd)
    _close(CONV[nd](xb, wb), CONV[nd](np.array(xb), np.array(wb)))
    g = np.broadcast_to(np.float64(1.0), CONV[nd](xb, wb).shape)
    for a, b in zip(ndconv.conv_backward(g, xb, wb), ndconv.conv_backward(np.array(g), np.array(xb), np.array(wb))):
        _close(a, b)
    _close(CONVT[nd](xb, wb.transpose((1, 0) + tuple(range(2, nd + 2))), stride=2),
           CONVT[nd](np.array(xb), np.array(wb).transpose((1, 0) + tuple(range(2, nd + 2))), stride=2))


# ------------------------------------------------------------------ Paddle's padding forms

def test_paddle_padding_forms():
    rng = np.random.default_rng(50)
    x = rng.standard_normal((1, 2, 6, 7, 5))
    w = rng.standard_normal((3, 2, 3, 2, 2))
    pairs = [(1, 0), (2, 1), (0, 1)]
    want = ndconv.conv3d(x, w, padding=pairs)
    _close(ndconv.conv3d(x, w, padding=[1, 0, 2, 1, 0, 1]), want)          # [d_front, d_back, ...]
    _close(ndconv.conv3d(x, w, padding=[(0, 0), (0, 0)] + pairs), want)    # N, C pairs first
    xl = np.moveaxis(x, 1, -1)
    _close(ndconv.conv3d(xl, w, padding=[(0, 0)] + pairs + [(0, 0)],       # NDHWC: N first, C last
                         data_format="NDHWC"), np.moveaxis(want, 1, -1))
    # a zero first spatial pair must not be mistaken for the channel pair
    zero_d = [(0, 0), (2, 1), (0, 1)]
    _close(ndconv.conv3d(xl, w, padding=[(0, 0)] + zero_d + [(0, 0)], data_format="NDHWC"),
           np.moveaxis(ndconv.conv3d(x, w, padding=zero_d), 1, -1))
    with pytest.raises(ValueError, match="batch and channel"):
        ndconv.conv3d(x, w, padding=[(0, 0), (1, 1)] + pairs)
    _close(ndconv.conv3d(x, w, padding="VALID"), ndconv.conv3d(x, w, padding=0))


@pytest.mark.parametrize("n, k, s", [(7, 3, 2), (8, 3, 2), (6, 4, 3), (5, 1, 2), (9, 2, 3)])
def test_paddle_same_convolution_gives_ceil(n, k, s):
    rng = np.random.default_rng(n * k * s)
    x = rng.standard_normal((1, 1, n))
    w = rng.standard_normal((1, 1, k))
    y = ndconv.conv1d(x, w, stride=s, padding="SAME")
    o = -(-n // s)
    assert y.shape[-1] == o
    pad_sum = max((o - 1) * s + k - n, 0)
    _close(y, ref.conv(x, w, stride=s, padding=[(pad_sum // 2, pad_sum - pad_sum // 2)]))


# ------------------------------------------------------------------ float16

def test_float16_accumulates_in_float32():
    # 4096 ones: a float16 accumulator stalls at 2048 (2048 + 1 rounds back to 2048)
    x = np.ones((1, 1, 4096), dtype=np.float16)
    w = np.ones((1, 1, 4096), dtype=np.float16)
    y = ndconv.conv1d(x, w)
    assert y.dtype == np.float16 and float(y[0, 0, 0]) == 4096.0
    gx, gw, gb = ndconv.conv_backward(np.ones((1, 1, 1), np.float16), x, w)
    assert gx.dtype == gw.dtype == gb.dtype == np.float16
    x = np.ones((1, 1, 4100), dtype=np.float16)
    g = np.ones((1, 1, 4097), dtype=np.float16)
    _, gw, gb = ndconv.conv_backward(g, x, np.ones((1, 1, 4), np.float16))
    assert float(gb[0]) == 4096.0        # 4097 rounds to 4096 in float16, never 2048
    assert np.all(gw == np.float16(4097))


# ------------------------------------------------------------------ workspace limit

WORKSPACE_CASES = [
    # (kind, input shape, weight shape, kwargs): small enough to run fast, big enough that a
    # 4 KiB limit splits the batch and, for the larger ones, the first output dim
    ("conv", (6, 3, 20), (4, 3, 3), dict(stride=2, padding=1)),
    ("conv", (3, 4, 12, 10), (6, 2, 3, 3), dict(stride=(2, 1), padding=[(1, 2), (0, 1)], dilation=(1, 2),
                                                groups=2)),
    ("conv", (2, 2, 8, 7, 6), (3, 2, 2, 3, 2), dict(stride=1, padding=1, dilation=2)),
    ("conv", (3, 4, 16, 16), (8, 1, 3, 3), dict(padding=1, groups=4)),             # depthwise x2
    ("conv", (3, 4, 9, 11), (8, 1, 3, 2), dict(stride=2, padding=(1, 0), groups=4)),
    ("convt", (3, 4, 6, 5), (4, 3, 4, 4), dict(stride=2, padding=1, output_padding=1)),
    ("convt", (2, 2, 5, 4, 3), (2, 2, 3, 2, 2), dict(stride=(2, 1, 3), padding=(1, 0, 1), dilation=2)),
    ("convt", (6, 3, 11), (3, 2, 5), dict(stride=3, padding=2, output_padding=2)),
    ("convt", (3, 4, 7, 6), (4, 1, 3, 3), dict(stride=2, padding=1, groups=4)),     # depthwise
]


def _run_all(kind, x, w, kw):
    rng = np.random.default_rng(0)
    if kind == "conv":
        y = ndconv.conv_nd(x, w, **kw)
        g = rng.standard_normal(y.shape)
        return (y,) + ndconv.conv_backward(g, x, w, kw.get("stride", 1), kw.get("padding", 0),
                                           kw.get("dilation", 1), kw.get("groups", 1))
    y = ndconv.conv_transpose_nd(x, w, **kw)
    g = rng.standard_normal(y.shape)
    return (y,) + ndconv.conv_backward(g, x, w, kw.get("stride", 1), kw.get("padding", 0),
                                       kw.get("dilation", 1), kw.get("groups", 1), transposed=True,
                                       output_padding=kw.get("output_padding", 0))


def _algorithms(engine):
    return tuple(getattr(engine, "algorithms", ())) or (None,)


@pytest.mark.parametrize("kind, xs, ws, kw", WORKSPACE_CASES, ids=[str(i) for i in range(len(WORKSPACE_CASES))])
def test_workspace_limit_splits_without_changing_results(kind, xs, ws, kw, small_workspace):
    """Each algorithm the engine has, where it applies: the same results at 4 KiB as at the
    default limit, and never a larger peak of temporaries."""
    engine = small_workspace
    rng = np.random.default_rng(sum(xs))
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    ran = 0
    for algorithm in _algorithms(engine):
        results, peaks = [], []
        try:
            for limit in (256 << 20, 4096):
                engine.workspace_limit = limit
                engine.peak_temp_bytes = 0
                if algorithm is None:
                    results.append(_run_all(kind, x, w, kw))
                else:
                    with engine.force(algorithm):
                        results.append(_run_all(kind, x, w, kw))
                peaks.append(engine.peak_temp_bytes)
        except ValueError as e:   # this algorithm does not cover one of the three primitives here
            assert "does not support" in str(e)
            continue
        ran += 1
        for a, b, what in zip(results[1], results[0], ("out", "grad_input", "grad_weight", "grad_bias")):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=f"{algorithm}: {what}")
        assert peaks[1] <= peaks[0], (algorithm, peaks)
        if algorithm == "im2col":   # splits down to single output rows
            assert peaks[1] < peaks[0], (algorithm, peaks)
    assert ran


def test_small_workspace_fixture_restores_the_limit(small_workspace):
    assert small_workspace.workspace_limit == 4096
    assert small_workspace is ndconv.get_engine(np.empty(0))
