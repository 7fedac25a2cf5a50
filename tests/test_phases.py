"""The phase form of strided convolutions (ndconv.engine.phases), against the naive
reference, on NumPy: the same code the GPU engine registers as its ``phases``
algorithm, driven here by a stand-in engine whose stride-1 calls go to the CPU engine."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ndconv
import reference as ref
from ndconv.engine import phases
from ndconv.engine.cpu import CPUEngine


class StandIn:
    """What ``Phases.run`` needs of an engine: a workspace limit, ``_note`` and ``_run``."""

    def __init__(self, workspace_limit=1 << 30):
        self.workspace_limit = workspace_limit
        self.cpu = CPUEngine()
        self.inner = []
        self.noted = 0

    def _note(self, *arrays):
        self.noted = max(self.noted, sum(a.nbytes for a in arrays))

    def _run(self, op, a, b, g, inner=False):
        assert inner and phases.unit_stride(g), "the phase form only makes stride-1 calls"
        self.inner.append((op, g))
        return getattr(self.cpu, op)(a, b, g)


def expected(x, w, gy, stride, pad, dilation, groups):
    return {"forward": ref.conv(x, w, None, stride, pad, dilation, groups),
            "backward_input": ref.conv_grad_input(gy, w, x.shape[2:], stride, pad, dilation, groups),
            "backward_weight": ref.conv_grad_weight(x, gy, w.shape, stride, pad, dilation, groups)}


def check(geom, x, w, gy, want, workspace_limit=1 << 30, dtype=np.float64, tol=1e-10):
    alg = phases.Phases()
    args = {"forward": (x, w), "backward_input": (gy, w), "backward_weight": (x, gy)}
    for op, value in want.items():
        assert alg.supports(op, geom, dtype)
        engine = StandIn(workspace_limit)
        a, b = (np.ascontiguousarray(v, dtype=dtype) for v in args[op])
        got = alg.run(engine, op, a, b, geom)
        assert got.dtype == dtype and got.shape == value.shape, op
        scale = max(1.0, float(np.abs(value).max())) if value.size else 1.0
        np.testing.assert_allclose(got, value, rtol=tol, atol=tol * scale, err_msg=f"{op} {geom}")
        assert engine.inner, op


def ints(data, nd, lo, hi, label, not_all_ones=False):
    """nd ints in [lo, hi]; with ``not_all_ones`` the first is raised to 2 when all are 1."""
    v = tuple(data.draw(st.lists(st.integers(lo, hi), min_size=nd, max_size=nd), label=label))
    return (2,) + v[1:] if not_all_ones and all(e == 1 for e in v) else v


def draw_arrays(data, stride, kernel, dilation, lo, hi, groups, cg):
    """x, w, gy (float64), the geometry and the padding pairs of a drawn convolution."""
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    x_size = tuple(data.draw(st.integers(max(1, e - a - b), max(1, e - a - b) + 5), label="x")
                   for e, a, b in zip(span, lo, hi))
    batch = data.draw(st.integers(1, 3), label="batch")
    og = data.draw(st.integers(1, 2), label="og")
    pad = [(a, b) for a, b in zip(lo, hi)]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, cg * groups) + x_size)
    w = rng.standard_normal((og * groups, cg) + kernel)
    geom, _ = ndconv.conv_geometry(x.shape, w.shape, None, stride, pad, dilation, groups)
    return x, w, rng.standard_normal(geom.y_shape), geom, pad


@settings(max_examples=60, deadline=None)
@given(data=st.data(), nd=st.integers(1, 3))
def test_phase_form_matches_reference(data, nd):
    stride = ints(data, nd, 1, 3, "stride", not_all_ones=True)
    kernel = ints(data, nd, 1, 4, "kernel")
    dilation = ints(data, nd, 1, 2, "dilation")
    lo, hi = ints(data, nd, 0, 2, "pad_lo"), ints(data, nd, 0, 2, "pad_hi")
    groups = data.draw(st.integers(1, 3), label="groups")
    x, w, gy, geom, pad = draw_arrays(data, stride, kernel, dilation, lo, hi, groups,
                                      data.draw(st.integers(1, 2), label="cg"))
    if phases.waste(geom) > phases.Phases.max_waste:
        assert not phases.Phases().supports("forward", geom, np.float64)
        return
    limit = data.draw(st.sampled_from([1 << 30, 64]), label="workspace")   # 64 B: one sample per chunk
    check(geom, x, w, gy, expected(x, w, gy, stride, pad, dilation, groups), workspace_limit=limit)


@pytest.mark.parametrize("kw", [
    dict(y=(2, 4, 5, 5), w=(4, 3, 4, 4), stride=2, padding=1, output_padding=1),     # DCGAN-like, X not covered
    dict(y=(1, 4, 3, 3, 3), w=(4, 2, 2, 2, 2), stride=2),                              # k = s: one 1x1 per phase
    dict(y=(2, 6, 7), w=(6, 2, 4), stride=2, padding=1, groups=3),
    dict(y=(1, 2, 3, 4), w=(2, 2, 3, 2), stride=(3, 2), padding=(0, 1), output_padding=(2, 1)),
])
def test_transposed_calls(kw):
    """The transposed face: conv_transpose's output is the phase form's backward_input."""
    rng = np.random.default_rng(1)
    y = rng.standard_normal(kw.pop("y"))
    w = rng.standard_normal(kw.pop("w"))
    geom, _ = ndconv.conv_transpose_geometry(y.shape, w.shape, None, kw.get("stride", 1), kw.get("padding", 0),
                                             kw.get("output_padding", 0), kw.get("groups", 1))
    out = ref.conv_transpose(y, w, None, kw.get("stride", 1), kw.get("padding", 0), kw.get("output_padding", 0),
                             kw.get("groups", 1))
    engine = StandIn()
    got = phases.Phases().run(engine, "backward_input", y, w, geom)
    np.testing.assert_allclose(got, out, rtol=1e-10, atol=1e-10)
    if phases.waste(geom) == 1.0:
        assert phases.Phases().preferred("backward_input", geom, np.float64)


def test_k_equals_stride_is_one_pointwise_call():
    geom, _ = ndconv.conv_transpose_geometry((2, 8, 4, 4), (8, 3, 2, 2), None, 2, 0, 0, 1)
    rng = np.random.default_rng(2)
    y, w = rng.standard_normal(geom.y_shape), rng.standard_normal(geom.w_shape)
    engine = StandIn()
    phases.Phases().run(engine, "backward_input", y, w, geom)
    (op, inner), = engine.inner
    assert op == "forward" and inner.kernel == (1, 1) and inner.pad_lo == (0, 0)
    assert inner.y_channels == 3 * 4 and inner.x_size == (4, 4)


def test_float32_and_float16_keep_their_dtype():
    geom, _ = ndconv.conv_geometry((2, 4, 9, 9), (6, 2, 4, 4), None, 2, 1, 1, 2)
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal(geom.x_shape), rng.standard_normal(geom.w_shape)
    gy = rng.standard_normal(geom.y_shape)
    want = expected(x, w, gy, 2, 1, 1, 2)
    check(geom, x, w, gy, want, dtype=np.float32, tol=1e-4)
    check(geom, x, w, gy, want, dtype=np.float16, tol=2e-2)


def test_supports_only_strided_calls_with_little_waste():
    alg = phases.Phases()
    unit, _ = ndconv.conv_geometry((1, 2, 8, 8), (2, 2, 3, 3), None, 1, 1)
    assert not alg.supports("forward", unit, np.float32)
    wasteful, _ = ndconv.conv_geometry((1, 2, 16, 16), (2, 2, 1, 1), None, 4)    # 1 tap of 16
    assert phases.waste(wasteful) == 16 and not alg.supports("forward", wasteful, np.float32)
    assert not alg.supports("forward", ndconv.conv_geometry((1, 2, 9), (2, 2, 3), None, 2)[0], np.int32)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), nd=st.integers(1, 3))
def test_space_to_batch_matches_reference(data, nd):
    dilation = ints(data, nd, 1, 3, "dilation", not_all_ones=True)
    kernel = ints(data, nd, 1, 3, "kernel")
    lo, hi = ints(data, nd, 0, 3, "pad_lo"), ints(data, nd, 0, 3, "pad_hi")
    x, w, gy, geom, pad = draw_arrays(data, (1,) * nd, kernel, dilation, lo, hi,
                                      data.draw(st.integers(1, 2), label="groups"), 2)
    want = expected(x, w, gy, 1, pad, dilation, geom.groups)
    limit = data.draw(st.sampled_from([1 << 30, 64]), label="workspace")
    alg = phases.SpaceToBatch()
    args = {"forward": (x, w), "backward_input": (gy, w), "backward_weight": (x, gy)}
    for op, value in want.items():
        assert alg.supports(op, geom, np.float64)
        engine = StandIn(limit)
        got = alg.run(engine, op, *args[op], geom)
        np.testing.assert_allclose(got, value, rtol=1e-10, atol=1e-10, err_msg=f"{op} {geom}")
        assert all(inner.dilation == (1,) * nd for _, inner in engine.inner)


def test_space_to_batch_supports_dilated_unit_stride_only():
    alg = phases.SpaceToBatch()
    dilated, _ = ndconv.conv_geometry((1, 2, 9, 9), (2, 2, 3, 3), None, 1, 2, 2)
    assert alg.supports("backward_weight", dilated, np.float32)
    assert not alg.supports("forward", ndconv.conv_geometry((1, 2, 9, 9), (2, 2, 3, 3), None, 1, 1)[0],
                            np.float32)
    assert not alg.supports("forward", ndconv.conv_geometry((1, 2, 9, 9), (2, 2, 3, 3), None, 2, 2, 2)[0],
                            np.float32)
    assert alg.preferred("forward", dilated, np.float32)
    depthwise, _ = ndconv.conv_geometry((1, 4, 9, 9), (4, 1, 3, 3), None, 1, 2, 2, 4)
    assert alg.supports("forward", depthwise, np.float32) and not alg.preferred("forward", depthwise, np.float32)
    gb = phases.batch_geometry(dilated)
    assert gb.batch == 4 and gb.dilation == (1, 1) and gb.y_size == (5, 5) and gb.x_size == (7, 7)
