"""The algorithm registry and the lazy GPU import: no CuPy or GPU needed (runs on CI)."""
import dataclasses
import subprocess
import sys

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from ndconv.engine.registry import OPS, Algorithm, Registry, check_op
from ndconv.geometry import conv_geometry


class _Only(Algorithm):
    def __init__(self, name, ops, deterministic=True, depthwise_only=False):
        self.name, self.ops, self.deterministic, self.depthwise_only = name, ops, deterministic, depthwise_only

    def supports(self, op, g, dtype):
        return op in self.ops and (g.depthwise or not self.depthwise_only)

    def run(self, engine, op, a, b, g):
        return self.name


def test_candidates_in_priority_order_and_filters():
    reg = Registry()
    reg.register(_Only("fast_dw", OPS, depthwise_only=True))
    reg.register(_Only("atomic", ("backward_weight",), deterministic=False))
    reg.register(_Only("generic", OPS))
    dw = conv_geometry((1, 4, 8, 8), (4, 1, 3, 3), groups=4)[0]
    dense = conv_geometry((1, 4, 8, 8), (4, 4, 3, 3))[0]
    names = lambda found: [a.name for a in found]  # noqa: E731
    assert names(reg.candidates("forward", dw, np.float32)) == ["fast_dw", "generic"]
    assert names(reg.candidates("forward", dense, np.float32)) == ["generic"]
    assert names(reg.candidates("backward_weight", dense, np.float32)) == ["generic"]
    assert names(reg.candidates("backward_weight", dense, np.float32, deterministic=False)) == ["atomic", "generic"]
    assert reg.names() == ("fast_dw", "atomic", "generic")
    assert "generic" in reg and "nope" not in reg
    assert reg.get("generic").run(None, "forward", None, None, dense) == "generic"


def test_ieee_engines_leave_tensor_core_algorithms_out():
    reg = Registry()
    tensor = reg.register(_Only("tensor", OPS))
    tensor.fp32_math = "tf32x3"
    reg.register(_Only("generic", OPS))
    dense = conv_geometry((1, 4, 8, 8), (4, 4, 3, 3))[0]
    assert [a.name for a in reg.candidates("forward", dense, np.float32)] == ["tensor", "generic"]
    assert [a.name for a in reg.candidates("forward", dense, np.float32, fp32_math="ieee")] == ["generic"]


def test_registry_errors():
    reg = Registry()
    reg.register(_Only("a", OPS))
    with pytest.raises(ValueError, match="already registered"):
        reg.register(_Only("a", OPS))
    with pytest.raises(ValueError, match=r"algorithm must be one of \('a',\), got algorithm='b'"):
        reg.get("b")
    with pytest.raises(ValueError, match="op must be one of"):
        check_op("forwards")
    assert check_op(None, allow_all=True) == OPS
    with pytest.raises(ValueError, match="op must be one of"):
        check_op(None)


def test_importing_ndconv_does_not_import_cupy():
    code = ("import sys, numpy as np, ndconv; ndconv.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2))); "
            "import ndconv.engine.registry; print('cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cudnn_module_without_a_gpu():
    """Importable anywhere; NDCONV_DISABLE_CUDNN turns it off; padding rule is pure Python."""
    code = ("import numpy as np; from ndconv.engine import cudnn; from ndconv.geometry import conv_geometry; "
            "g = conv_geometry((1, 1, 9, 9), (1, 1, 3, 3), padding=1)[0]; "
            "print(cudnn.available(), cudnn.load_error(), cudnn.Cudnn().supports('forward', g, np.float32), "
            "cudnn.symmetric_padding(g))")
    import os
    env = dict(os.environ, NDCONV_DISABLE_CUDNN="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False disabled by NDCONV_DISABLE_CUDNN False (1, 1)"


def test_cudnn_is_not_offered_windows_that_miss_the_input():
    """A window wholly in the padding (or skipping x through dilation) is left to the other
    algorithms: cuDNN's graph API returned 1e28 for one such weight gradient on an H200."""
    from ndconv.engine import cudnn
    from ndconv.geometry import conv_geometry

    def g(x, w, **kw):
        return conv_geometry(x, w, None, **kw)[0]
    assert not cudnn.every_window_reads_input(g((2, 1, 1), (1, 1, 2), stride=2, padding=[(2, 1)]))
    assert not cudnn.every_window_reads_input(g((1, 1, 2), (1, 1, 2), dilation=3, padding=[(1, 1)]))
    assert not cudnn.every_window_reads_input(g((1, 1, 3, 4), (1, 1, 1, 1), padding=[(0, 0), (0, 1)]))
    assert cudnn.every_window_reads_input(g((1, 1, 9, 9), (1, 1, 3, 3), padding=2))
    assert cudnn.every_window_reads_input(g((1, 1, 7), (1, 1, 3), stride=2, dilation=2, padding=[(4, 0)]))


def test_cudnn_graph_padding_rule_and_alignment():
    """Pure Python: the graph API's (pre, post) padding and the address alignment it is told."""
    from ndconv.engine import cudnn_graph

    def g(x, w, **kw):
        return conv_geometry(x, w, **kw)[0]

    assert cudnn_graph.graph_padding(g((1, 1, 9, 9), (1, 1, 3, 3), padding=1)) == ((1, 1), (1, 1))
    # more padding after than before ('same' with an even kernel pads 1 and 2): not taken
    assert cudnn_graph.graph_padding(g((1, 1, 8, 8), (1, 1, 4, 4), padding="same")) is None
    assert cudnn_graph.graph_padding(g((1, 1, 1, 1), (2, 1, 1, 1), padding=[(0, 0), (0, 1)])) is None
    # high padding no window reads is dropped
    assert cudnn_graph.graph_padding(g((1, 1, 9), (1, 1, 3), stride=2, padding=[(1, 2)])) == ((1,), (1,))
    # trailing input positions no window reads need no padding
    assert cudnn_graph.graph_padding(g((1, 1, 10), (1, 1, 3), stride=4)) == ((0,), (0,))
    # fewer outputs than cuDNN gives without any high padding: not expressible
    short = dataclasses.replace(g((1, 1, 10), (1, 1, 3)), y_size=(7,), pad_hi=(-1,))
    assert cudnn_graph.graph_padding(short) is None
    assert not cudnn_graph.CudnnGraph().supports("forward", short, np.float32)
    assert cudnn_graph._alignment(256, 512, 1024) == 16
    assert cudnn_graph._alignment(256, 516, 1024) == 4
    assert cudnn_graph._alignment(258, 512) == 2


def emulate_implicit_gemm(plans, w, src, out_size):
    """What the implicit_gemm kernel computes from its plans, in NumPy (float64)."""
    src = np.asarray(src, np.float64)
    if plans[0].a_form == "weight":            # k = s: one GEMM per sample, tables of one sample
        per = out_size // src.shape[0]
        return np.concatenate([_emulate_dense(plans, w, s, per) for s in src])
    return _emulate(plans, w, src, out_size)


def _emulate_dense(plans, w, src, out_size):
    """The DENSE_B kernel: A is w itself as (K, M), B[k, n] = src[k * N + n] (no tables)."""
    (p,) = plans
    K, M, N = p.shape
    out = np.full(out_size, np.nan)
    dst = (p.mrow[:, None].astype(np.int64) + p.ccol[None, :]).reshape(-1)
    assert np.all(np.isnan(out[dst])) and len(np.unique(dst)) == dst.size, "a position written twice"
    out[dst] = (np.asarray(w, np.float64).reshape(K, M).T @ src.reshape(K, N)).reshape(-1)
    return out


def _emulate(plans, w, src, out_size):
    out = np.full(out_size, np.nan)            # every position must be written
    wf, srcf = np.asarray(w, np.float64).reshape(-1), src.reshape(-1)
    for p in plans:
        K, M, N = p.shape
        a = wf[p.a_index].reshape(K, M)
        valid = np.ones((K, N), dtype=bool)
        for d in range(3):
            c = p.ncol[None, :, 1 + d].astype(np.int64) + p.krow[:, None, 1 + d]
            valid &= (c >= 0) & (c < p.extents[d])
        where = p.krow[:, None, 0].astype(np.int64) + p.ncol[None, :, 0]
        b = np.where(valid, srcf[np.where(valid, where, 0)], 0.0)
        dst = (p.mrow[:, None].astype(np.int64) + p.ccol[None, :]).reshape(-1)
        assert np.all(np.isnan(out[dst])), "a position written twice"
        out[dst] = (a.T @ b).reshape(-1)
    return out


_settings = hypothesis.settings(max_examples=int(__import__("os").environ.get("IMPLICIT_EXAMPLES", 60)), deadline=None)


@st.composite
def implicit_geometries(draw):
    from ndconv.geometry import conv_transpose_geometry
    nd = draw(st.integers(1, 3))
    k = [draw(st.integers(1, 4)) for _ in range(nd)]
    s = [draw(st.integers(1, 3)) for _ in range(nd)]
    d = [draw(st.integers(1, 2)) for _ in range(nd)]
    p = [draw(st.integers(0, (kk - 1) * dd)) for kk, dd in zip(k, d)]
    cx, cy, n = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    if draw(st.booleans()):            # the transposed form: output_padding below the stride
        size = [draw(st.integers(1, 4)) for _ in range(nd)]
        op = [draw(st.integers(0, max(0, max(ss, dd) - 1))) for ss, dd in zip(s, d)]
        op = [min(o, max(ss, dd) - 1) for o, ss, dd in zip(op, s, d)]
        try:
            return conv_transpose_geometry((n, cy) + tuple(size), (cy, cx) + tuple(k), None, s, p, op, 1, d)[0]
        except ValueError:             # padding larger than the full output
            hypothesis.reject()
    size = [draw(st.integers(max(1, (kk - 1) * dd + 1 - 2 * pp), 9)) for kk, dd, pp in zip(k, d, p)]
    return conv_geometry((n, cx) + tuple(size), (cy, cx) + tuple(k), stride=s, padding=p, dilation=d)[0]


@_settings
@hypothesis.given(implicit_geometries())
def test_implicit_gemm_plans_are_the_convolution(g):
    """The tables the implicit_gemm kernel indexes by, run in NumPy, give the CPU engine's
    forward and input gradient (every position written once) on random geometries."""
    from ndconv.engine import gpu_implicit
    from ndconv.engine.cpu import CPUEngine
    rng = np.random.default_rng(0)
    x, w, gy = (rng.standard_normal(s) for s in (g.x_shape, g.w_shape, g.y_shape))
    cpu = CPUEngine()
    fwd = gpu_implicit.forward_plan(g)
    assert [p.a_form for p in fwd] == ["transposed"]
    np.testing.assert_allclose(emulate_implicit_gemm(fwd, w, x, int(np.prod(g.y_shape))).reshape(g.y_shape),
                               cpu.forward(x, w, g), rtol=1e-12, atol=1e-12)
    bwd = gpu_implicit.backward_input_plan(g)
    np.testing.assert_allclose(emulate_implicit_gemm(bwd, w, gy, int(np.prod(g.x_shape))).reshape(g.x_shape),
                               cpu.backward_input(gy, w, g), rtol=1e-12, atol=1e-12)
    for p in fwd + bwd:
        assert all(t.dtype == np.int32 for t in (p.krow, p.ncol, p.mrow, p.ccol))


def test_implicit_gemm_k_equal_s_input_gradient_is_one_gemm():
    from ndconv.engine.gpu_implicit import ImplicitGemm, backward_input_plan
    from ndconv.geometry import conv_transpose_geometry
    k2s2 = conv_transpose_geometry((2, 8, 5, 5), (8, 4, 2, 2), None, 2)[0]
    (plan,) = backward_input_plan(k2s2)
    assert plan.a_form == "weight" and plan.shape == (8, 4 * 4, 25)      # K = Cy, M = Cx * taps, per sample
    assert ImplicitGemm().preferred("backward_input", k2s2, np.float32)
    k4s2 = conv_transpose_geometry((2, 8, 5, 5), (8, 4, 4, 4), None, 2, 1)[0]
    assert [p.shape[0] for p in backward_input_plan(k4s2)] == [8 * 4] * 4      # 4 phases of 2x2 taps
    assert not ImplicitGemm().preferred("backward_input", k4s2, np.float32)
    one = conv_geometry((2, 8, 5, 5), (4, 8, 1, 1))[0]                         # 1x1: a plain GEMM
    assert backward_input_plan(one)[0].a_form == "weight"
    assert not ImplicitGemm().preferred("backward_input", one, np.float32)
    assert not ImplicitGemm().preferred("backward_input", conv_geometry((2, 8, 5, 5), (4, 8, 3, 3))[0],
                                        np.float32)
    k1s2 = conv_geometry((1, 2, 7), (3, 2, 1), stride=2)[0]                    # odd positions: no tap
    assert [p.shape[0] for p in backward_input_plan(k1s2)] == [3, 0]


def test_implicit_gemm_supports():
    from ndconv.engine.gpu_implicit import ImplicitGemm
    alg = ImplicitGemm()
    g = conv_geometry((2, 4, 9, 9), (8, 4, 3, 3), padding=1)[0]
    assert alg.supports("forward", g, np.float32) and alg.supports("backward_input", g, np.float32)
    assert not alg.supports("backward_weight", g, np.float32)
    assert not alg.supports("forward", g, np.float16) and not alg.supports("forward", g, np.float64)
    assert not alg.supports("forward", conv_geometry((2, 4, 9, 9), (8, 2, 3, 3), groups=2)[0], np.float32)
