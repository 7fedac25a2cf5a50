"""The module API: layers equal the functional API, life cycle, Sequential, errors, modes."""
import numpy as np
import pytest

import ndconv
from ndconv import functional as F
from ndconv import gpuarray
from ndconv.containers import Sequential
from ndconv.modules import (Conv1D, Conv2D, Conv3D, ConvND, Deconv1D, Deconv2D, Deconv3D, DeconvND,
                            Module)
from ndconv.variable import Variable

host = gpuarray.to_host


def dev(a):
    return gpuarray.to_gpu(np.asarray(a))


def rand(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# (class, ctor args, ctor kwargs, input shape)
LAYERS = [
    (Conv1D, (4, 6, 3), dict(stride=2, pad=1, dilation=1, groups=2), (2, 4, 11)),
    (Conv2D, (3, 4, (2, 3)), dict(stride=(1, 2), pad=((1, 0), (2, 1)), dilation=(2, 1)), (2, 3, 7, 8)),
    (Conv3D, (2, 4, 2), dict(pad=1, groups=2, useBias=False), (1, 2, 4, 5, 3)),
    (Deconv1D, (4, 6, 3), dict(stride=3, pad=1, groups=2, postpad=2), (2, 4, 5)),
    (Deconv2D, (3, 4, (3, 2)), dict(stride=2, pad=((1, 2), (0, 1)), dilation=(1, 2)), (2, 3, 4, 5)),
    (Deconv3D, (4, 2, 2), dict(stride=(2, 1, 2), groups=2, postpad=(1, 0, 0)), (1, 4, 3, 2, 3)),
]


def _expected(mod, x, gy):
    W = mod.vars["W"].data
    b = mod.vars["b"].data.reshape(-1) if "b" in mod.vars else None
    if mod.transposed:
        y = F.conv_transpose_nd(x, W, b, mod.stride, mod.pad, mod.postpad, mod.groups, mod.dilation)
    else:
        y = F.conv_nd(x, W, b, mod.stride, mod.pad, mod.dilation, mod.groups)
    gx, gw, gb = F.conv_backward(gy, x, W, mod.stride, mod.pad, mod.dilation, mod.groups,
                                 transposed=mod.transposed, output_padding=mod.postpad)
    return y, gx, gw, gb


@pytest.mark.parametrize("cls,args,kwargs,shape", LAYERS, ids=[c[0].__name__ for c in LAYERS])
def test_forward_backward_equal_functional(cls, args, kwargs, shape):
    rng = np.random.default_rng(1)
    mod = cls(*args, **kwargs, rng=rng)
    if "b" in mod.vars:
        mod.setVar("b", Variable(dev(rand(rng, *mod.bshape))))
    x = dev(rand(rng, *shape))
    y = mod(x)
    assert y is mod.data and mod.inData is x
    assert y.shape == mod.dataShapeFrom(shape)
    gy = dev(rand(rng, *y.shape))
    gx = mod.backward(gy)
    ey, egx, egw, egb = _expected(mod, x, gy)
    np.testing.assert_array_equal(host(y), host(ey))
    np.testing.assert_array_equal(host(gx), host(egx))
    assert mod.grad is gx and gx.shape == x.shape
    np.testing.assert_array_equal(host(mod.vars["W"].grad), host(egw))
    if "b" in mod.vars:
        np.testing.assert_array_equal(host(mod.vars["b"].grad), host(egb).reshape(mod.bshape))
    else:
        assert mod.b is None


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_nd_classes_equal_fixed_dimension_classes(nd):
    x = dev(rand(np.random.default_rng(2), 2, 3, *([6] * nd)))
    for generic, fixed in ((ConvND, (Conv1D, Conv2D, Conv3D)), (DeconvND, (Deconv1D, Deconv2D, Deconv3D))):
        a = generic(nd, 3, 4, 3, 2, 1, rng=5)
        b = fixed[nd - 1](3, 4, 3, 2, 1, rng=5)
        np.testing.assert_array_equal(host(a.W), host(b.W))
        np.testing.assert_array_equal(host(a(x)), host(b(x)))


def test_weight_and_bias_shapes():
    assert Conv3D(6, 9, 3, groups=3).W.shape == (9, 2, 3, 3, 3)
    assert Conv3D(6, 9, 3, groups=3).b.shape == (1, 9, 1, 1, 1)
    assert Deconv2D(6, 9, (2, 4), groups=3).W.shape == (6, 3, 2, 4)
    assert Deconv1D(6, 9, 2).b.shape == (1, 9, 1)
    assert np.all(host(Conv2D(2, 3, 1).b) == 0)
    empty = Conv2D(2, 3, 2, empty=True)
    assert empty.W is None and empty.b is None and empty.vars == {}


def test_scale_and_momentum_accumulate_parameter_gradients():
    rng = np.random.default_rng(3)
    mod = Conv2D(2, 3, 3, pad=1, rng=rng)
    x = dev(rand(rng, 2, 2, 5, 5))
    g1, g2 = dev(rand(rng, 2, 3, 5, 5)), dev(rand(rng, 2, 3, 5, 5))
    mod(x)
    mod.backward(g1)
    w1, b1 = host(mod.vars["W"].grad).copy(), host(mod.vars["b"].grad).copy()
    buf = mod.vars["W"].grad
    mod.backward(g2)                                   # default: overwrite
    w2 = host(mod.vars["W"].grad).copy()
    assert mod.vars["W"].grad is buf                   # written in place
    mod.backward(g1, scale=0.5, momentum=2.0)          # 0.5*new + 2*old
    np.testing.assert_allclose(host(mod.vars["W"].grad), 0.5 * w1 + 2 * w2, rtol=1e-5, atol=1e-5)
    mod.zeroGradParams()
    mod.backward(g1, momentum=1.0)                     # accumulate onto zero
    np.testing.assert_allclose(host(mod.vars["W"].grad), w1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(host(mod.vars["b"].grad), b1, rtol=1e-6, atol=1e-6)
    mod.backward(g1, updParamGrads=False)              # parameters untouched, input grad computed
    np.testing.assert_allclose(host(mod.vars["W"].grad), w1, rtol=1e-6, atol=1e-6)
    assert mod.grad is not None
    mod.backward(g1, updGrad=False)
    assert mod.grad is None


def test_update_params_is_gradient_descent():
    rng = np.random.default_rng(4)
    mod = Deconv2D(2, 2, 2, stride=2, rng=rng)
    mod(dev(rand(rng, 1, 2, 3, 3)))
    mod.backward(dev(rand(rng, 1, 2, 6, 6)))
    W, G = host(mod.W).copy(), host(mod.vars["W"].grad).copy()
    mod.updateParams(0.25)
    np.testing.assert_allclose(host(mod.W), W - 0.25 * G, rtol=1e-6)
    frozen = Variable(dev(np.ones(mod.bshape, np.float32)), withgrad=False)
    mod.setVar("b", frozen)
    mod.updateParams(1.0)
    np.testing.assert_array_equal(host(mod.b), 1.0)


def test_training_conv_then_deconv_reduces_loss():
    rng = np.random.default_rng(5)
    net = Sequential()
    net.append(Conv2D(1, 4, 3, stride=2, pad=1, rng=rng, name="down"))
    net.append(Deconv2D(4, 1, 3, stride=2, pad=1, postpad=1, rng=rng, name="up"))
    x = dev(rand(rng, 4, 1, 8, 8))
    target = dev(host(x) * 0.5)

    def loss_and_grad():
        y = host(net(x))
        diff = y - host(target)
        return float((diff ** 2).mean()), dev((2 * diff / diff.size).astype(np.float32))

    first, _ = loss_and_grad()
    for _ in range(60):
        loss, g = loss_and_grad()
        net.backward(g, updGrad=False)
        net.updateParams(0.5)
    last, _ = loss_and_grad()
    assert last < 0.5 * first, (first, last)


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(6)
    mod = Deconv1D(2, 2, 3, stride=2, pad=1, postpad=1, rng=rng)
    mod.calcMode(np.float64)
    x = dev(rng.standard_normal((1, 2, 4)))
    gy = dev(rng.standard_normal(mod.dataShapeFrom((1, 2, 4))))
    mod(x)
    mod.backward(gy)
    W = host(mod.W).copy()
    eps = 1e-6
    for idx in [(0, 0, 0), (1, 1, 2), (0, 1, 1)]:
        Wp, Wm = W.copy(), W.copy()
        Wp[idx] += eps
        Wm[idx] -= eps
        mod.setVar("W", Variable(dev(Wp)))
        fp = float((host(mod(x)) * host(gy)).sum())
        mod.setVar("W", Variable(dev(Wm)))
        fm = float((host(mod(x)) * host(gy)).sum())
        mod.setVar("W", Variable(dev(W)))
        mod(x)
        mod.backward(gy)
        assert abs((fp - fm) / (2 * eps) - host(mod.vars["W"].grad)[idx]) < 1e-6


# ------------------------------------------------------------------ Sequential

class Square(Module):
    """A parameter-free module written against the documented subclass contract."""

    def updateData(self, data):
        self.data = data * data

    def updateGrad(self, grad):
        self.grad = 2 * self.inData * grad


def test_sequential_list_api_and_names():
    seq = Sequential()
    a, b, c = Conv2D(1, 2, 3, pad=1), Square(), Conv2D(2, 1, 1, name="head")
    seq.append(a).append(b)
    seq.extend([c])
    assert [n for n, _ in seq.children()] == ["0", "1", "head"]
    assert seq["0"] is a and seq[1] is b and seq[-1] is c and seq["head"] is c
    assert len(seq) == 3 and "head" in seq and a in seq
    sub = seq[1:]
    assert isinstance(sub, Sequential) and list(sub) == [b, c]
    d = Square()
    seq.insert(0, d)
    assert d.name == "3" and seq[0] is d
    assert seq.pop(0) is d and "3" not in seq
    with pytest.raises(ValueError, match="already holds a module named 'head'"):
        seq.append(Conv2D(1, 1, 1, name="head"))
    with pytest.raises(KeyError, match="no module named 'nope'"):
        seq["nope"]
    with pytest.raises(TypeError, match="Sequential holds Modules"):
        seq.append(np.zeros(3))
    with pytest.raises(IndexError):
        seq[7]


def test_sequential_forward_backward_and_dotted_vars():
    rng = np.random.default_rng(7)
    seq = Sequential(name="net")
    seq.append(Conv2D(2, 3, 3, rng=rng, name="conv"))
    seq.append(Square(name="sq"))
    seq.append(Deconv2D(3, 2, 3, rng=rng, name="deconv"))
    x = dev(rand(rng, 2, 2, 6, 6))
    y = seq(x)
    ref = seq["deconv"](seq["sq"](seq["conv"](x)))
    np.testing.assert_array_equal(host(y), host(ref))
    assert seq.dataShapeFrom(x.shape) == y.shape == (2, 2, 6, 6)
    assert seq.gradShapeFrom(y.shape) == x.shape
    seq(x)
    g = dev(rand(rng, *y.shape))
    gx = seq.backward(g)
    # Manual chain in reverse.
    g3 = seq["deconv"].grad
    assert gx is seq["conv"].grad and gx.shape == x.shape
    np.testing.assert_allclose(host(seq["sq"].grad), 2 * host(seq["conv"].data) * host(g3), rtol=1e-6)
    assert sorted(seq.vars) == ["conv.W", "conv.b", "deconv.W", "deconv.b"]
    assert seq.getVar("conv.W") is seq["conv"].vars["W"]
    new = Variable(dev(np.zeros((3, 2, 3, 3), np.float32)))
    seq.setVar("conv.W", new)
    assert seq["conv"].W is new.data
    with pytest.raises(KeyError, match="'module.param'"):
        seq.getVar("W")
    with pytest.raises(KeyError, match="no parameter 'Q'"):
        seq.getVar("conv.Q")
    with pytest.raises(ValueError, match="Conv2D 'conv'"):
        seq(dev(rand(rng, 2, 5, 6, 6)))          # checked before any module runs
    seq.evalMode()
    assert not seq.train and not seq["conv"].train
    seq.trainMode()
    assert seq["deconv"].train
    seq.zeroGradParams()
    assert all(np.all(host(v.grad) == 0) for v in seq.vars.values())


def test_sequential_first_module_skips_input_grad_when_not_asked():
    rng = np.random.default_rng(8)
    seq = Sequential().extend([Conv1D(1, 2, 3, rng=rng), Deconv1D(2, 1, 3, rng=rng)])
    x = dev(rand(rng, 1, 1, 9))
    seq(x)
    assert seq.backward(dev(rand(rng, 1, 1, 9)), updGrad=False) is None
    assert seq[0].grad is None and seq[1].grad is not None


# ------------------------------------------------------------------ shapes and errors

def test_shape_methods():
    conv = Conv2D(3, 8, 3, stride=2, pad=1)
    assert conv.dataShapeFrom((4, 3, 9, 9)) == (4, 8, 5, 5)
    assert conv.gradShapeFrom((4, 8, 5, 5)) == (4, 3, 9, 9)
    deconv = Deconv3D(8, 3, 4, stride=2, pad=1)
    assert deconv.dataShapeFrom((1, 8, 4, 5, 6)) == (1, 3, 8, 10, 12)
    assert deconv.gradShapeFrom((1, 3, 8, 10, 12)) == (1, 8, 4, 5, 6)
    conv.checkDataShape((1, 3, 4, 4))
    with pytest.raises(ValueError, match="must be 4-D"):
        conv.checkDataShape((3, 4, 4))
    with pytest.raises(ValueError, match="to have 3 channels, but got 5"):
        conv.checkDataShape((1, 5, 4, 4))
    with pytest.raises(ValueError, match="Kernel size can't be greater"):
        Conv2D(1, 1, 5).checkDataShape((1, 1, 3, 3))
    conv(dev(np.zeros((1, 3, 4, 4), np.float32)))
    conv.checkGradShape((1, 8, 2, 2))
    with pytest.raises(ValueError, match=r"grad must have the output's shape \(1, 8, 2, 2\)"):
        conv.checkGradShape((1, 8, 3, 2))
    with pytest.raises(ValueError, match="grad must have the output's shape"):
        conv.backward(dev(np.zeros((1, 8, 3, 3), np.float32)))


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(inmaps=0), ValueError, "inmaps=0"),
    (dict(outmaps=2.5), TypeError, "outmaps=2.5"),
    (dict(size=0), ValueError, "size=0"),
    (dict(size=(2, 2, 2)), TypeError, "size="),
    (dict(stride=0), ValueError, "stride=0"),
    (dict(dilation=-1), ValueError, "dilation=-1"),
    (dict(pad=-1), ValueError, "pad=-1"),
    (dict(pad=((1, -1), (0, 0))), ValueError, "pad="),
    (dict(pad="same"), TypeError, "pad='same'"),
    (dict(groups=3), ValueError, "groups=3"),
    (dict(groups=0), ValueError, "groups=0"),
    (dict(initscheme="bogus"), ValueError, "initscheme='bogus'"),
    (dict(initscheme=("he", "sideways")), ValueError, "initscheme="),
    (dict(wscale=-1.0, initscheme="gaussian"), ValueError, "wscale=-1.0"),
    (dict(useBias="yes"), TypeError, "useBias='yes'"),
    (dict(padding_mode="mirror"), ValueError, "padding_mode='mirror'"),
    (dict(name="a.b"), ValueError, "name='a.b'"),
])
def test_constructor_errors_name_the_parameter(kwargs, exc, msg):
    args = dict(inmaps=4, outmaps=4, size=2)
    args.update(kwargs)
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        Conv2D(**args)


def test_deconv_postpad_rules():
    assert Deconv2D(1, 1, 3, stride=2, postpad=1).dataShapeFrom((1, 1, 4, 4)) == (1, 1, 10, 10)
    assert Deconv2D(1, 1, 3, dilation=3, postpad=2).dataShapeFrom((1, 1, 4, 4)) == (1, 1, 12, 12)
    with pytest.raises(ValueError, match="postpad must be smaller"):
        Deconv2D(1, 1, 3, stride=2, postpad=2)
    with pytest.raises(ValueError, match="postpad="):
        Deconv2D(1, 1, 3, postpad=-1)
    with pytest.raises(TypeError):
        Deconv2D(1, 1, 3, 1, 0, 1, 1.0, True, None, None, False, 1, 1)   # postpad is keyword-only


def test_data_errors():
    conv = Conv2D(2, 2, 2)
    with pytest.raises(TypeError, match="data dtype must be float32"):
        conv(dev(np.zeros((1, 2, 3, 3), np.float64)))
    with pytest.raises(TypeError, match="NumPy or CuPy array"):
        conv([[1.0]])
    with pytest.raises(RuntimeError, match="backward called before forward"):
        Conv2D(2, 2, 2).backward(dev(np.zeros((1, 2, 2, 2), np.float32)))
    empty = Conv2D(2, 2, 2, empty=True)
    with pytest.raises(RuntimeError, match="W is not set"):
        empty(dev(np.zeros((1, 2, 3, 3), np.float32)))


def test_set_var_checks():
    conv = Conv2D(2, 3, 2)
    with pytest.raises(ValueError, match=r"'W' must have shape \(3, 2, 2, 2\)"):
        conv.setVar("W", Variable(dev(np.zeros((3, 2, 3, 3), np.float32))))
    with pytest.raises(TypeError, match="'W' must have dtype float32"):
        conv.setVar("W", Variable(dev(np.zeros((3, 2, 2, 2), np.float64))))
    with pytest.raises(KeyError, match="no parameter 'V'"):
        conv.setVar("V", Variable(dev(np.zeros(1, np.float32))))
    with pytest.raises(KeyError, match="no parameter 'b'"):
        Conv2D(2, 3, 2, useBias=False).setVar("b", Variable(dev(np.zeros((1, 3, 1, 1), np.float32))))
    with pytest.raises(TypeError, match="NumPy or CuPy array"):
        Variable([1.0, 2.0])
    # Attribute assignment goes through the same checks.
    conv.W = dev(np.ones((3, 2, 2, 2), np.float32))
    assert np.all(host(conv.getVar("W").data) == 1)
    with pytest.raises(ValueError):
        conv.W = dev(np.ones((2, 2), np.float32))


def test_empty_then_set_var_runs():
    conv = Conv2D(1, 2, 2, empty=True, useBias=False)
    conv.setVar("W", Variable(dev(np.ones((2, 1, 2, 2), np.float32))))
    out = conv(dev(np.ones((1, 1, 3, 3), np.float32)))
    assert np.all(host(out) == 4)


def test_calc_mode_float16():
    rng = np.random.default_rng(9)
    conv = Conv2D(3, 4, 3, pad=1, rng=rng)
    x = rand(rng, 2, 3, 6, 6)
    ref = host(conv(dev(x))).copy()
    conv.calcMode(np.float16)
    assert conv.W.dtype == np.float16 and conv.b.dtype == np.float16
    assert conv.vars["W"].grad.dtype == np.float16
    with pytest.raises(TypeError, match="data dtype must be float16"):
        conv(dev(x))
    out = conv(dev(x.astype(np.float16)))
    assert out.dtype == np.float16
    np.testing.assert_allclose(host(out).astype(np.float32), ref, rtol=2e-2, atol=2e-2)
    conv.backward(dev(np.ones(out.shape, np.float16)))
    assert conv.vars["W"].grad.dtype == np.float16 and conv.grad.dtype == np.float16
    conv.calcMode(np.float64)
    assert conv(dev(x.astype(np.float64))).dtype == np.float64
    with pytest.raises(TypeError, match="calcMode supports float16, float32 and float64"):
        conv.calcMode(np.int32)
    seq = Sequential().extend([Conv1D(1, 1, 1), Deconv1D(1, 1, 1)]).calcMode(np.float16)
    assert all(v.dtype == np.float16 for v in seq.vars.values())


def test_optimize_for_shape_asks_the_engine(monkeypatch):
    conv = Deconv2D(4, 2, 3, stride=2)
    engine = ndconv.get_engine(conv.W)
    calls = []
    monkeypatch.setattr(engine, "optimize", lambda geom, dtype: calls.append((geom, dtype)), raising=False)
    geom = conv.optimizeForShape((8, 4, 5, 5))
    assert calls == [(geom, np.dtype(np.float32))]
    assert geom.x_shape == (8, 2, 11, 11) and geom.y_shape == (8, 4, 5, 5)
    with pytest.raises(ValueError, match="to have 4 channels"):
        conv.optimizeForShape((8, 3, 5, 5))
    assert len(calls) == 1
    seq = Sequential().extend([Conv2D(4, 4, 3), conv])
    seq.optimizeForShape((8, 4, 7, 7))
    assert calls[-1][0].y_shape == (8, 4, 5, 5)


def test_optimize_for_shape_without_engine_support(monkeypatch):
    conv = Conv3D(2, 2, 3)
    engine = ndconv.get_engine(conv.W)
    if hasattr(engine, "optimize"):
        monkeypatch.delattr(type(engine), "optimize", raising=False)
        monkeypatch.delattr(engine, "optimize", raising=False)
    geom = conv.optimizeForShape((1, 2, 5, 5, 5))
    assert geom.y_shape == (1, 2, 3, 3, 3)


def test_base_module_requires_update_methods():
    class Bare(Module):
        pass
    with pytest.raises(NotImplementedError, match="updateData"):
        Bare()(np.zeros(3, np.float32))


def test_gpuarray_helpers():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    g = gpuarray.to_gpu(a)
    assert g is not a
    g[0, 0] = 99                                      # a copy, never a view of the caller's array
    assert a[0, 0] == 0
    assert host(g).shape == (2, 3) and host(g)[0, 0] == 99
    assert gpuarray.zeros((2, 2)).dtype == np.float32 and np.all(host(gpuarray.zeros((2, 2))) == 0)
    assert gpuarray.empty((3,), dtype=np.float16).dtype == np.float16
    assert gpuarray.is_device_array(g) == gpuarray.gpu_available()
