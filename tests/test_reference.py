"""The engine against the naive direct-loop reference (tests/reference.py), float64.

Small random geometries for 1-, 2- and 3-D, convolution (every padding mode) and
transposed convolution (asymmetric padding, output_padding), forward and every
gradient.  A few hand-computed cases pin the reference itself down, so that a
bug shared by the reference and the engine cannot hide.
"""
from __future__ import annotations

import numpy as np
import pytest

import ndconv
import reference as ref

SEEDS = range(12)


def _conv_arrays(rng, c):
    x = rng.standard_normal((c["batch"], c["c_in"]) + c["x_size"])
    w = rng.standard_normal((c["c_out"], c["c_in"] // c["groups"]) + c["kernel"])
    b = rng.standard_normal(c["c_out"])
    return x, w, b


def _check(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10, err_msg=what)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("seed", SEEDS)
def test_conv_matches_reference(nd, seed):
    rng = np.random.default_rng(1000 * nd + seed)
    c = ref.random_conv_case(rng, nd)
    x, w, b = _conv_arrays(rng, c)
    args = dict(stride=c["stride"], padding=ref.pairs(c["lo"], c["hi"]), dilation=c["dilation"],
                groups=c["groups"])
    rargs = dict(stride=c["stride"], padding=ref.pairs(c["lo"], c["hi"]), dilation=c["dilation"],
                 groups=c["groups"], padding_mode=c["mode"])
    y = ndconv.conv_nd(x, w, b, padding_mode=c["mode"], **args)
    y_ref = ref.conv(x, w, b, **rargs)
    _check(y, y_ref, f"forward {c}")
    gy = rng.standard_normal(y_ref.shape)
    gx, gw, gb = ndconv.conv_backward(gy, x, w, padding_mode=c["mode"], **args)
    _check(gx, ref.conv_grad_input(gy, w, c["x_size"], **rargs), f"grad_input {c}")
    _check(gw, ref.conv_grad_weight(x, gy, w.shape, **rargs), f"grad_weight {c}")
    _check(gb, ref.bias_grad(gy), f"grad_bias {c}")


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("seed", SEEDS)
def test_conv_transpose_matches_reference(nd, seed):
    rng = np.random.default_rng(2000 * nd + seed)
    c = ref.random_transpose_case(rng, nd)
    y = rng.standard_normal((c["batch"], c["c_in"]) + c["y_size"])
    w = rng.standard_normal((c["c_in"], c["c_out"] // c["groups"]) + c["kernel"])
    b = rng.standard_normal(c["c_out"])
    pad = ref.pairs(c["lo"], c["hi"])
    out = ndconv.conv_transpose_nd(y, w, b, stride=c["stride"], padding=pad,
                                   output_padding=c["output_padding"], groups=c["groups"],
                                   dilation=c["dilation"])
    out_ref = ref.conv_transpose(y, w, b, c["stride"], pad, c["output_padding"], c["groups"],
                                 c["dilation"])
    assert out_ref.shape[2:] == c["out_size"]
    _check(out, out_ref, f"forward {c}")
    gout = rng.standard_normal(out_ref.shape)
    gy, gw, gb = ndconv.conv_backward(gout, y, w, c["stride"], pad, c["dilation"], c["groups"],
                                      transposed=True, output_padding=c["output_padding"])
    _check(gy, ref.conv_transpose_grad_input(gout, w, c["y_size"], c["stride"], pad, c["groups"],
                                             c["dilation"]), f"grad_input {c}")
    _check(gw, ref.conv_transpose_grad_weight(y, gout, w.shape, c["stride"], pad, c["groups"],
                                              c["dilation"]), f"grad_weight {c}")
    _check(gb, ref.bias_grad(gout), f"grad_bias {c}")


# ------------------------------------------------------------------ the reference itself

def test_reference_conv_by_hand():
    x = np.arange(1.0, 6.0).reshape(1, 1, 5)          # 1 2 3 4 5
    w = np.array([1.0, 10.0]).reshape(1, 1, 2)
    # padded 0 1 2 3 4 5 0, stride 2, dilation 2: windows start at 0, 2, 4 -> taps (p, p+2)
    y = ref.conv(x, w, stride=2, padding=1, dilation=2)
    np.testing.assert_array_equal(y.ravel(), [0 + 10 * 2, 2 + 10 * 4, 4 + 0])
    y = ref.conv(x, w, padding=[(2, 0)], padding_mode="reflect")   # 3 2 1 2 3 4 5
    np.testing.assert_array_equal(y.ravel(), [3 + 20, 2 + 10, 1 + 20, 2 + 30, 3 + 40, 4 + 50])
    y = ref.conv(x, w, padding=[(0, 1)], padding_mode="circular")  # 1 2 3 4 5 1
    np.testing.assert_array_equal(y.ravel(), [21, 32, 43, 54, 15])


def test_reference_transpose_by_hand():
    y = np.array([1.0, 2.0]).reshape(1, 1, 2)
    w = np.array([1.0, 10.0, 100.0]).reshape(1, 1, 3)
    # stride 2: copies at 0 and 2 -> [1, 10, 101+1, 20, 200]
    full = ref.conv_transpose(y, w, stride=2)
    np.testing.assert_array_equal(full.ravel(), [1, 10, 102, 20, 200])
    # padding 1 crops one at each end; output_padding 1 uncrops the back one
    np.testing.assert_array_equal(ref.conv_transpose(y, w, stride=2, padding=1).ravel(), [10, 102, 20])
    np.testing.assert_array_equal(
        ref.conv_transpose(y, w, stride=2, padding=1, output_padding=1).ravel(), [10, 102, 20, 200])
    # no padding left to uncrop: the extra position is zero
    np.testing.assert_array_equal(
        ref.conv_transpose(y, w, stride=2, output_padding=1).ravel(), [1, 10, 102, 20, 200, 0])


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_reference_adjoint_identities(nd):
    """<conv(x), g> == <x, conv_grad_input(g)> and the transpose is that same map."""
    rng = np.random.default_rng(7 + nd)
    for _ in range(4):
        c = ref.random_conv_case(rng, nd, modes=("zeros",), max_batch=2)
        c["batch"] = max(c["batch"], 1)
        x, w, _ = _conv_arrays(rng, c)
        pad = ref.pairs(c["lo"], c["hi"])
        y = ref.conv(x, w, None, c["stride"], pad, c["dilation"], c["groups"])
        g = rng.standard_normal(y.shape)
        gx = ref.conv_grad_input(g, w, c["x_size"], c["stride"], pad, c["dilation"], c["groups"])
        gw = ref.conv_grad_weight(x, g, w.shape, c["stride"], pad, c["dilation"], c["groups"])
        np.testing.assert_allclose(np.vdot(y, g), np.vdot(x, gx), rtol=1e-10)
        np.testing.assert_allclose(np.vdot(y, g), np.vdot(w, gw), rtol=1e-10)
        # the transposed convolution with the same geometry, output_padding chosen to hit x_size
        smallest = ref.conv_transpose_output_size(y.shape[2:], c["kernel"], c["stride"], c["lo"],
                                                  c["hi"], c["dilation"], (0,) * nd)
        op = tuple(a - b for a, b in zip(c["x_size"], smallest))
        t = ref.conv_transpose(g, w, None, c["stride"], pad, op, c["groups"], c["dilation"])
        np.testing.assert_allclose(t, gx, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ every algorithm of the engine

def _engine_algorithms():
    engine = ndconv.get_engine(np.empty(0))
    return tuple(getattr(engine, "algorithms", ()))


@pytest.mark.skipif(not _engine_algorithms(), reason="the engine has a single algorithm")
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("depthwise", [False, True])
def test_every_algorithm_matches_reference(nd, seed, depthwise):
    """Each algorithm the engine may choose, forced on each primitive it supports (the
    automatic choice only exercises one per geometry)."""
    engine = ndconv.get_engine(np.empty(0))
    rng = np.random.default_rng(3000 * nd + seed + 100 * depthwise)
    c = ref.random_conv_case(rng, nd, modes=("zeros",))
    c["batch"] = max(c["batch"], 1)
    if seed % 2 == 0:   # stride 1 reaches the paths that need it (and the phase paths less waste)
        c["stride"] = (1,) * nd
    if depthwise:
        c["c_in"] = c["groups"] = max(c["groups"], 2)
        c["c_out"] = c["groups"] * int(rng.integers(1, 3))
    x, w, _ = _conv_arrays(rng, c)
    pad = ref.pairs(c["lo"], c["hi"])
    geom, _ = ndconv.conv_geometry(x.shape, w.shape, None, c["stride"], pad, c["dilation"], c["groups"])
    gy = rng.standard_normal(geom.y_shape)
    expected = {
        "forward": ref.conv(x, w, None, c["stride"], pad, c["dilation"], c["groups"]),
        "backward_input": ref.conv_grad_input(gy, w, c["x_size"], c["stride"], pad, c["dilation"],
                                              c["groups"]),
        "backward_weight": ref.conv_grad_weight(x, gy, w.shape, c["stride"], pad, c["dilation"],
                                                c["groups"]),
    }
    args = {"forward": (x, w), "backward_input": (gy, w), "backward_weight": (x, gy)}
    for algorithm in engine.algorithms:
        for op, want in expected.items():
            if not engine.supports(algorithm, op, geom):
                continue
            for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
                a, b = (v.astype(dtype) for v in args[op])
                with engine.force(algorithm):
                    got = getattr(engine, op)(a, b, geom)
                assert got.dtype == dtype, (algorithm, op)
                scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
                np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale,
                                           err_msg=f"{algorithm} {op} {dtype.__name__} {c}")
