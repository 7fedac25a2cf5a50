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
