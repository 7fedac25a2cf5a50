"""The algorithm registry and the lazy GPU import: no CuPy or GPU needed (runs on CI)."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

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


@pytest.mark.parametrize("x_shape,w_shape,stride", [
    ((2, 4, 3, 5), (4, 3, 2, 2), 2),
    ((2, 5, 3, 2, 4), (5, 3, 2, 3, 2), (2, 3, 2)),
    ((3, 6, 7), (6, 2, 4), 4),
    ((1, 3, 4, 2), (3, 2, 3, 1), (3, 1)),
])
def test_ks_gemm_offset_tables_reproduce_the_convolution(x_shape, w_shape, stride):
    """The tables the ks_gemm kernel indexes by, used here in NumPy: the scattered GEMM is
    the transposed convolution and the gathered GEMM is the convolution."""
    from ndconv.engine import gpu_ks_gemm
    from ndconv.engine.cpu import CPUEngine
    from ndconv.geometry import conv_transpose_geometry
    g = conv_transpose_geometry(x_shape, w_shape, None, stride, 0)[0]
    assert gpu_ks_gemm.applies(g)
    taps, cols = gpu_ks_gemm.offset_tables(g)
    assert taps.dtype == cols.dtype == np.int32
    rng = np.random.default_rng(0)
    x, w, gy = (rng.standard_normal(s) for s in (g.x_shape, g.w_shape, g.y_shape))
    where = (taps[:, None] + cols[None, :]).reshape(-1)
    assert np.array_equal(np.sort(where), np.arange(g.x_channels * np.prod(g.x_size)))   # every position once
    a = w.reshape(g.y_channels, -1)                                   # (K, M) for the input gradient
    gx = np.zeros((g.batch, where.size))
    for n in range(g.batch):
        gx[n, where] = (a.T @ gy[n].reshape(g.y_channels, -1)).reshape(-1)
    cpu = CPUEngine()
    np.testing.assert_allclose(gx.reshape(g.x_shape), cpu.backward_input(gy, w, g), rtol=1e-12, atol=1e-12)
    y = np.einsum("mk,nkj->nmj", a, x.reshape(g.batch, -1)[:, taps[:, None] + cols[None, :]])
    np.testing.assert_allclose(y.reshape(g.y_shape), cpu.forward(x, w, g), rtol=1e-12, atol=1e-12)


def test_ks_gemm_applies_only_where_every_position_is_one_tap():
    from ndconv.engine.gpu_ks_gemm import applies
    from ndconv.geometry import conv_transpose_geometry

    def t(x, w, stride, padding=0, output_padding=0, groups=1, dilation=1):
        return conv_transpose_geometry(x, w, None, stride, padding, output_padding, groups, dilation)[0]

    assert applies(t((2, 8, 5, 5), (8, 4, 2, 2), 2))
    assert not applies(t((2, 8, 5, 5), (8, 4, 4, 4), 2, 1))             # k != s
    assert not applies(t((2, 8, 5, 5), (8, 4, 2, 2), 2, 1))             # padding crops
    assert not applies(t((2, 8, 5, 5), (8, 4, 2, 2), 2, 0, 1))          # output_padding adds positions
    assert not applies(t((2, 8, 5, 5), (8, 2, 2, 2), 2, groups=2))      # groups
    assert not applies(t((2, 8, 5, 5), (8, 4, 1, 1), 1))                # a 1x1 call: plain GEMM paths
    assert not applies(conv_geometry((2, 4, 7, 7), (8, 4, 2, 2), stride=2)[0])   # x longer than s*y
