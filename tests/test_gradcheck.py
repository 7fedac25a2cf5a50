"""Finite-difference checks of every gradient, float64, on ndconv alone.

For ``L = <f(input, weight, bias), G>`` with a fixed random ``G``, each analytic
gradient from ``conv_backward`` must match central differences
``(L(p + h) - L(p - h)) / 2h`` element by element.  ``f`` is linear in each
argument, so central differences are exact up to rounding; the tolerance only
absorbs that rounding.
"""
from __future__ import annotations

import numpy as np
import pytest

import ndconv

H = 1e-3


def _numeric_grad(loss, p):
    g = np.zeros_like(p)
    for idx in np.ndindex(*p.shape):
        keep = p[idx]
        p[idx] = keep + H
        up = loss()
        p[idx] = keep - H
        down = loss()
        p[idx] = keep
        g[idx] = (up - down) / (2 * H)
    return g


def _check(analytic, numeric, what):
    scale = max(1.0, float(np.abs(numeric).max()))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-7, atol=1e-8 * scale, err_msg=what)


CONV_CASES = [
    # (x shape, w shape, kwargs)
    ((2, 2, 7), (3, 2, 3), dict(stride=2, padding=[(2, 1)], dilation=1)),
    ((1, 3, 9), (3, 1, 2), dict(stride=1, padding=2, dilation=3, groups=3, padding_mode="reflect")),
    ((2, 2, 5, 4), (4, 1, 2, 3), dict(stride=(2, 1), padding=[(1, 0), (2, 1)], dilation=(1, 2), groups=2)),
    ((1, 2, 5, 5), (2, 2, 3, 3), dict(stride=1, padding="same", padding_mode="circular")),
    ((1, 1, 4, 5), (2, 1, 2, 2), dict(stride=3, padding=1, padding_mode="replicate")),
    ((1, 2, 4, 3, 4), (2, 2, 2, 2, 2), dict(stride=(1, 2, 2), padding=[(1, 0), (0, 1), (1, 1)],
                                            dilation=(2, 1, 1))),
]

TRANSPOSE_CASES = [
    # (input shape, w shape, kwargs)
    ((2, 2, 4), (2, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    ((1, 2, 3), (2, 1, 2), dict(stride=1, padding=[(0, 2)], dilation=3, output_padding=2, groups=2)),
    ((1, 2, 3, 2), (2, 2, 3, 2), dict(stride=(2, 3), padding=[(1, 2), (0, 1)], output_padding=(1, 2))),
    ((2, 4, 2, 3), (4, 1, 2, 2), dict(stride=2, padding=0, dilation=(1, 2), groups=4)),
    ((1, 2, 2, 2, 2), (2, 2, 2, 3, 2), dict(stride=(2, 1, 2), padding=(0, 1, 1), output_padding=(1, 0, 0))),
]


@pytest.mark.parametrize("xs, ws, kw", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv_gradients_match_finite_differences(xs, ws, kw):
    rng = np.random.default_rng(sum(xs) + sum(ws))
    x, w, b = rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[0])
    conv_kw = dict(kw)
    mode = conv_kw.pop("padding_mode", "zeros")
    y = ndconv.conv_nd(x, w, b, padding_mode=mode, **conv_kw)
    G = rng.standard_normal(y.shape)

    def loss():
        return float(np.vdot(ndconv.conv_nd(x, w, b, padding_mode=mode, **conv_kw), G))

    gx, gw, gb = ndconv.conv_backward(G, x, w, conv_kw.get("stride", 1), conv_kw.get("padding", 0),
                                      conv_kw.get("dilation", 1), conv_kw.get("groups", 1),
                                      padding_mode=mode)
    _check(gx, _numeric_grad(loss, x), "grad_input")
    _check(gw, _numeric_grad(loss, w), "grad_weight")
    _check(gb, _numeric_grad(loss, b), "grad_bias")


@pytest.mark.parametrize("ys, ws, kw", TRANSPOSE_CASES, ids=[str(i) for i in range(len(TRANSPOSE_CASES))])
def test_conv_transpose_gradients_match_finite_differences(ys, ws, kw):
    rng = np.random.default_rng(sum(ys) + sum(ws) + 1)
    groups = kw.get("groups", 1)
    y, w, b = rng.standard_normal(ys), rng.standard_normal(ws), rng.standard_normal(ws[1] * groups)
    out = ndconv.conv_transpose_nd(y, w, b, **kw)
    G = rng.standard_normal(out.shape)

    def loss():
        return float(np.vdot(ndconv.conv_transpose_nd(y, w, b, **kw), G))

    gy, gw, gb = ndconv.conv_backward(G, y, w, kw.get("stride", 1), kw.get("padding", 0),
                                      kw.get("dilation", 1), groups, transposed=True,
                                      output_padding=kw.get("output_padding", 0))
    _check(gy, _numeric_grad(loss, y), "grad_input")
    _check(gw, _numeric_grad(loss, w), "grad_weight")
    _check(gb, _numeric_grad(loss, b), "grad_bias")


def test_conv_transpose_gradients_with_output_size():
    rng = np.random.default_rng(11)
    y, w = rng.standard_normal((1, 2, 3, 3)), rng.standard_normal((2, 2, 3, 3))
    kw = dict(stride=3, padding=1, output_size=(9, 8))   # range [7, 9] per dim
    out = ndconv.conv_transpose2d(y, w, None, kw["stride"], kw["padding"], output_size=kw["output_size"])
    assert out.shape == (1, 2, 9, 8)
    G = rng.standard_normal(out.shape)

    def loss():
        return float(np.vdot(ndconv.conv_transpose2d(y, w, None, 3, 1, output_size=(9, 8)), G))

    gy, gw, _ = ndconv.conv_backward(G, y, w, 3, 1, transposed=True, output_size=(9, 8),
                                     needs=("input", "weight"))
    _check(gy, _numeric_grad(loss, y), "grad_input")
    _check(gw, _numeric_grad(loss, w), "grad_weight")


def test_needs_selects_gradients():
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((1, 2, 5)), rng.standard_normal((3, 2, 2))
    g = rng.standard_normal((1, 3, 4))
    full = ndconv.conv_backward(g, x, w)
    only_w = ndconv.conv_backward(g, x, w, needs=("weight",))
    assert only_w[0] is None and only_w[2] is None
    np.testing.assert_array_equal(only_w[1], full[1])
    only_b = ndconv.conv_backward(g, x, w, needs=("bias",))
    assert only_b[0] is None and only_b[1] is None
    np.testing.assert_array_equal(only_b[2], full[2])
    assert ndconv.conv_backward(g, x, w, needs=()) == (None, None, None)
