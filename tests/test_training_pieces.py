"""The pieces training needs: generated data, activations, the MSE cost, SGD and Adam.

Gradients are checked against central finite differences in float64; optimizer
steps against hand-computed numbers and against torch.optim on the same
gradients.
"""
from __future__ import annotations

import numpy as np
import pytest

from ndconv.cost import MSE
from ndconv.datasets import make_shapes, train_heldout
from ndconv.optimizers import SGD, Adam, named_variables
from ndconv.variable import Variable

# ---------------------------------------------------------------------------- helpers


def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar f at x (float64), element by element."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f(x)
        flat[i] = old - eps
        fm = f(x)
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


# ---------------------------------------------------------------------------- data


def test_shapes_deterministic_in_range_and_varied():
    a = make_shapes(20, size=16, seed=3)
    b = make_shapes(20, size=16, seed=3)
    assert a.shape == (20, 1, 16, 16) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert not np.array_equal(a, make_shapes(20, size=16, seed=4))
    # every image has some ink and some background; images differ from each other
    per_image = a.reshape(20, -1)
    assert (per_image.max(1) > 0.3).all() and (per_image.min(1) == 0.0).all()
    assert len({img.tobytes() for img in a}) == 20


def test_heldout_independent_of_train_size():
    tr1, ho1 = train_heldout(10, 5, size=12, seed=1)
    tr2, ho2 = train_heldout(30, 5, size=12, seed=1)
    assert np.array_equal(ho1, ho2)
    assert np.array_equal(tr1, tr2[:10])
    assert not any(np.array_equal(h, t) for h in ho1 for t in tr2)


@pytest.mark.parametrize("kwargs, name", [
    (dict(n=-1), "n="), (dict(n=4, size=2), "size="), (dict(n=4, seed=-5), "seed="),
    (dict(n=4, seed=1.5), "seed="), (dict(n=4, max_shapes=0), "max_shapes="),
])
def test_shapes_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_shapes(**kwargs)


# ---------------------------------------------------------------------------- MSE


def test_mse_value_and_gradient_float64():
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((2, 3, 4))
    target = rng.standard_normal((2, 3, 4))
    pred0, target0 = pred.copy(), target.copy()
    error, grad = MSE()(pred, target)
    assert error == pytest.approx(np.mean((pred - target) ** 2), rel=1e-14)
    assert grad.shape == pred.shape and grad.dtype == np.float64
    num = numeric_grad(lambda p: MSE()(p, target)[0], pred.copy())
    np.testing.assert_allclose(grad, num, rtol=1e-7, atol=1e-10)
    assert np.array_equal(pred, pred0) and np.array_equal(target, target0)  # inputs untouched


def test_mse_float32_accumulates_in_float64_and_keeps_dtype():
    pred = np.full((1000, 1000), 1.0001, np.float32)
    target = np.zeros_like(pred)
    cost = MSE()
    error, grad = cost(pred, target)
    assert isinstance(error, float)
    assert error == pytest.approx(float(np.float32(1.0001)) ** 2, rel=1e-12)
    assert grad.dtype == np.float32
    assert cost.validate(pred, target) == error and cost.error == error


def test_mse_float16_gradient_does_not_underflow():
    pred = np.ones((200, 200, 4), np.float16)
    _, grad = MSE()(pred, np.zeros_like(pred))
    assert grad.dtype == np.float16 and (grad > 0).all()


def test_mse_errors():
    with pytest.raises(ValueError, match=r"pred.shape=\(2, 3\).*target.shape=\(3, 2\)"):
        MSE()(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(TypeError, match="target"):
        MSE()(np.zeros(3), [0.0, 0.0, 0.0])
    with pytest.raises(TypeError, match="int64"):
        MSE()(np.zeros(3, np.int64), np.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        MSE()(np.zeros((0, 3)), np.zeros((0, 3)))


# ---------------------------------------------------------------------------- optimizers


def _vars(*arrays):
    return {f"p{i}": Variable(np.array(a, dtype=np.float64)) for i, a in enumerate(arrays)}


def test_sgd_momentum_hand_computed():
    params = _vars([1.0, 2.0])
    opt = SGD(learnRate=0.1, momRate=0.9).setupOn(params)
    var = params["p0"]
    var.grad[...] = [0.5, -1.0]
    opt.update()                        # v = g = [0.5, -1]; p = [1, 2] - 0.1 v
    np.testing.assert_allclose(var.data, [0.95, 2.1], rtol=1e-15)
    var.grad[...] = [0.5, -1.0]
    opt.step()                          # v = 0.9 [0.5, -1] + [0.5, -1] = [0.95, -1.9]
    np.testing.assert_allclose(var.data, [0.855, 2.29], rtol=1e-15)
    var.grad[...] = [0.0, 0.0]
    opt.update()                        # v = 0.9 v = [0.855, -1.71]: momentum keeps moving
    np.testing.assert_allclose(var.data, [0.7695, 2.461], rtol=1e-14)


def test_plain_sgd_hand_computed():
    params = _vars([[1.0, -1.0]])
    opt = SGD(learnRate=0.5, momRate=0.0).setupOn(params)
    params["p0"].grad[...] = [[2.0, 4.0]]
    opt.update()
    np.testing.assert_allclose(params["p0"].data, [[0.0, -3.0]])


def test_adam_hand_computed():
    params = _vars([1.0, -2.0])
    opt = Adam(alpha=0.1, beta1=0.9, beta2=0.999, epsilon=1e-8).setupOn(params)
    var = params["p0"]
    # step 1: m = 0.1 g, v = 0.001 g^2, bias-corrected m/sqrt(v) = sign(g)
    var.grad[...] = [0.2, -3.0]
    opt.update()
    np.testing.assert_allclose(var.data, [1.0 - 0.1 * 0.2 / (0.2 + 1e-8), -2.0 + 0.1 * 3.0 / (3.0 + 1e-8)],
                               rtol=1e-15)
    p1 = var.data.copy()
    # step 2, g = [1, 1]: m = 0.9*0.1*g1 + 0.1*g2, v = 0.999*0.001*g1^2 + 0.001*g2^2
    var.grad[...] = [1.0, 1.0]
    opt.update()
    g1, g2 = np.array([0.2, -3.0]), np.array([1.0, 1.0])
    m = 0.09 * g1 + 0.1 * g2
    v = 0.000999 * g1 ** 2 + 0.001 * g2 ** 2
    expected = p1 - 0.1 / (1 - 0.9 ** 2) * m / (np.sqrt(v) / np.sqrt(1 - 0.999 ** 2) + 1e-8)
    np.testing.assert_allclose(var.data, expected, rtol=1e-14)
    assert opt.t == 2


@pytest.mark.requires_torch
@pytest.mark.parametrize("kind", ["sgd", "sgd0", "adam"])
def test_optimizers_match_torch(torch, kind):
    rng = np.random.default_rng(7)
    start = [rng.standard_normal((3, 4)), rng.standard_normal(5)]
    grads = [[rng.standard_normal(a.shape) for a in start] for _ in range(6)]
    params = _vars(*start)
    tparams = [torch.tensor(a.copy(), requires_grad=True) for a in start]
    if kind == "adam":
        opt = Adam(alpha=0.01, beta1=0.8, beta2=0.99, epsilon=1e-6)
        topt = torch.optim.Adam(tparams, lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    else:
        mom = 0.9 if kind == "sgd" else 0.0
        opt = SGD(learnRate=0.05, momRate=mom)
        topt = torch.optim.SGD(tparams, lr=0.05, momentum=mom)
    opt.setupOn(params)
    for step in grads:
        for var, tp, g in zip(params.values(), tparams, step):
            var.grad[...] = g
            tp.grad = torch.tensor(g)
        opt.update()
        topt.step()
    for var, tp in zip(params.values(), tparams):
        np.testing.assert_allclose(var.data, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_float32_parameters_stay_float32_and_in_place():
    var = Variable(np.ones((2, 2), np.float32))
    data_ref = var.data
    for opt in (SGD(learnRate=0.1), Adam(alpha=0.1)):
        opt.setupOn([var])
        var.grad[...] = 1.0
        opt.update()
        assert var.data is data_ref and var.data.dtype == np.float32
        assert (var.data < 1.0).all()


def test_frozen_variables_are_skipped_and_state_is_per_parameter():
    frozen = Variable(np.ones(3), withgrad=False)
    live = Variable(np.ones(3))
    opt = Adam(alpha=0.1).setupOn({"frozen": frozen, "live": live})
    live.grad[...] = 1.0
    opt.update()
    np.testing.assert_array_equal(frozen.data, np.ones(3))
    assert (live.data < 1).all()
    opt.zeroGradParams()
    np.testing.assert_array_equal(live.grad, 0)


def test_shared_variable_collected_once():
    v = Variable(np.zeros(2))
    assert [name for name, _ in named_variables({"a": v, "b": v})] == ["a"]


@pytest.mark.parametrize("make, name", [
    (lambda: SGD(learnRate=-0.1), "learnRate=-0.1"), (lambda: SGD(learnRate=0), "learnRate=0"),
    (lambda: SGD(momRate=1.0), "momRate=1.0"), (lambda: SGD(learnRate=float("nan")), "learnRate=nan"),
    (lambda: Adam(alpha=0), "alpha=0"), (lambda: Adam(beta1=1.5), "beta1=1.5"),
    (lambda: Adam(beta2=-0.1), "beta2=-0.1"), (lambda: Adam(epsilon=0), "epsilon=0"),
    (lambda: Adam(alpha="fast"), "alpha='fast'"),
])
def test_optimizer_bad_hyperparameters(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_optimizer_misuse():
    with pytest.raises(RuntimeError, match="setupOn"):
        Adam().update()
    with pytest.raises(TypeError, match="optimizer target"):
        Adam().setupOn(42)
    with pytest.raises(TypeError, match="Variable"):
        Adam().setupOn({"w": np.zeros(3)})
    with pytest.raises(ValueError, match="no parameters"):
        Adam().setupOn({})


# ---------------------------------------------------------------------------- activations

from ndconv.activations import ReLU, Sigmoid, Tanh  # noqa: E402
from ndconv.containers import Sequential  # noqa: E402
from ndconv.modules import Conv2D, Deconv2D  # noqa: E402

ACTIVATIONS = {
    "ReLU": (ReLU, lambda x: np.maximum(x, 0)),
    "Sigmoid": (Sigmoid, lambda x: 1 / (1 + np.exp(-x))),
    "Tanh": (Tanh, np.tanh),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_gradient_finite_differences(name):
    cls, ref = ACTIVATIONS[name]
    rng = np.random.default_rng(11)
    x = rng.uniform(-3, 3, (2, 3, 4, 5))
    x[np.abs(x) < 0.05] = 0.5            # keep ReLU's kink away from the differences
    weights = rng.standard_normal(x.shape)
    act = cls()
    y = act(x)
    np.testing.assert_allclose(y, ref(x), rtol=1e-14, atol=1e-15)
    assert act.data is y and y.dtype == np.float64
    grad = act.backward(weights)
    assert act.grad is grad and grad.shape == x.shape
    num = numeric_grad(lambda z: float((cls()(z) * weights).sum()), x.copy())
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_activation_keeps_dtype_and_input(name, dtype):
    cls, ref = ACTIVATIONS[name]
    x = np.linspace(-4, 4, 24, dtype=dtype).reshape(2, 3, 4)
    x0 = x.copy()
    act = cls()
    y = act(x)
    g = act.backward(np.ones_like(x))
    assert y.dtype == dtype and g.dtype == dtype
    np.testing.assert_array_equal(x, x0)
    tol = 2e-3 if dtype == np.float16 else 1e-6
    np.testing.assert_allclose(y.astype(np.float64), ref(x.astype(np.float64)), rtol=tol, atol=tol)


def test_sigmoid_saturates_without_overflow():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        y = Sigmoid()(x)
    np.testing.assert_allclose(y, [0.0, 1.9287499e-22, 0.5, 1.0, 1.0], rtol=1e-6)
    assert np.isfinite(y).all()


def test_relu_gradient_is_zero_at_zero_and_nan_propagates():
    act = ReLU()
    act(np.array([-1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(act.backward(np.array([5.0, 5.0, 5.0])), [0.0, 0.0, 5.0])
    assert np.isnan(act.backward(np.array([1.0, 1.0, np.nan]))[2])


def test_activation_life_cycle_errors():
    with pytest.raises(RuntimeError, match="before forward"):
        Tanh().backward(np.ones(3))
    act = Sigmoid()
    act(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        act.backward(np.ones(3))
    with pytest.raises(TypeError, match="int64"):
        ReLU()(np.zeros(3, np.int64))


@pytest.mark.requires_torch
def test_activations_match_torch(torch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 7)) * 4
    g = rng.standard_normal(x.shape)
    for name, tf in (("ReLU", torch.relu), ("Sigmoid", torch.sigmoid), ("Tanh", torch.tanh)):
        act = ACTIVATIONS[name][0]()
        tx = torch.tensor(x, requires_grad=True)
        ty = tf(tx)
        ty.backward(torch.tensor(g))
        np.testing.assert_allclose(act(x), ty.detach().numpy(), rtol=1e-14, atol=1e-16)
        # near saturation 1 - y keeps few digits in both libraries: rtol 1e-7, not 1e-14
        np.testing.assert_allclose(act.backward(g), tx.grad.numpy(), rtol=1e-7, atol=1e-16)


# ---------------------------------------------------------------------------- a tiny training run


def _tiny_net(seed):
    rng = np.random.default_rng(seed)
    net = Sequential()
    net.append(Conv2D(1, 4, 4, stride=2, pad=1, name="enc", rng=rng))
    net.append(Tanh(name="act"))
    net.append(Deconv2D(4, 1, 4, stride=2, pad=1, name="dec", rng=rng))
    net.append(Sigmoid(name="out"))
    return net.moveTo("cpu")        # new weights land on the GPU when one is present


@pytest.mark.parametrize("make_opt", [lambda: Adam(alpha=0.02), lambda: SGD(learnRate=2.0, momRate=0.9)],
                         ids=["adam", "sgd"])
def test_tiny_training_run_reduces_loss(make_opt):
    x = make_shapes(16, size=12, seed=5)
    net = _tiny_net(0)
    opt = make_opt().setupOn(net)
    assert sorted(name for name, _ in opt.params) == ["dec.W", "dec.b", "enc.W", "enc.b"]
    cost = MSE()
    losses = []
    for _ in range(60):
        error, grad = cost(net(x), x)
        net.backward(grad)
        opt.update()
        losses.append(error)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_training_is_deterministic():
    x = make_shapes(8, size=12, seed=6)

    def train():
        net = _tiny_net(3)
        opt = Adam(alpha=0.01).setupOn(net)
        for _ in range(5):
            _, grad = MSE()(net(x), x)
            net.backward(grad)
            opt.update()
        return net.getVar("enc.W").data.copy(), MSE()(net(x), x)[0]

    (w1, e1), (w2, e2) = train(), train()
    assert np.array_equal(w1, w2) and e1 == e2
