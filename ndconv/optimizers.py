"""Optimizers for ndconv modules: SGD with momentum, and Adam.

Usage, in the seed framework's style::

    opt = Adam(alpha=1e-3)
    opt.setupOn(net)              # collects every parameter Variable of net
    for x, t in batches:
        net(x)
        error, grad = cost(net.data, t)
        net.backward(grad)        # fills var.grad of each parameter
        opt.update()              # one step; opt.step() is the same call

``setupOn`` accepts a module or container (its ``namedVars()``), a
``{name: Variable}`` mapping, or an iterable of Variables.  A Variable is anything with ``.data`` and ``.grad`` arrays.

Sign convention: ``var.grad`` holds the derivative of the loss (as produced by
:class:`ndconv.cost.MSE`), so each step moves ``var.data`` *against* it.
Parameters are updated in place, so modules keep their array references, and
the optimizer state lives on the parameter's device (NumPy or CuPy).  A
parameter whose ``grad`` is ``None`` is skipped for that step.
"""
from __future__ import annotations

import math

from .engine import array_module

__all__ = ["Optimizer", "SGD", "Adam", "named_variables"]


def named_variables(target):
    """``[(name, Variable), ...]`` of a module, a mapping or an iterable of Variables.

    For a module (or container) the dotted names come from its ``namedVars()``
    (``"enc1.W"``).  Each Variable appears once even when shared.
    """
    if hasattr(target, "namedVars"):
        items = list(target.namedVars().items())
    elif isinstance(target, dict):
        items = list(target.items())
    else:
        try:
            items = [(str(i), v) for i, v in enumerate(target)]
        except TypeError:
            raise TypeError("optimizer target must be a module, a {name: Variable} mapping or an iterable of "
                            f"Variables, got {type(target).__name__}") from None
    out, seen = [], set()
    for name, var in items:
        if not (hasattr(var, "data") and hasattr(var, "grad")):
            raise TypeError(f"parameter {name!r} must be a Variable with .data and .grad, got {type(var).__name__}")
        if id(var) not in seen:
            seen.add(id(var))
            out.append((str(name), var))
    return out


class Optimizer:
    """The common part: parameter collection, per-parameter state, the step counter.

    Subclasses implement ``_step(data, grad, state)``, updating ``data`` in place.
    """

    def __init__(self):
        self.params = []        # [(name, Variable)]
        self.states = {}        # name -> dict of state arrays
        self.t = 0              # number of update() calls since setupOn

    def setupOn(self, target, useGlobalState=True):
        """Attach to the parameters of ``target``; resets every state and the step count.

        ``useGlobalState`` is accepted for compatibility with the seed framework,
        where it selects one state buffer for all parameters; state here is
        always per parameter, which gives the same arithmetic.
        """
        params = named_variables(target)
        if not params:
            raise ValueError(f"{type(self).__name__}.setupOn: {type(target).__name__} has no parameters to optimize")
        self.params = params
        self.states = {name: {} for name, _ in params}
        self.t = 0
        return self

    def zeroGradParams(self):
        """Set every collected parameter gradient to zero (in place)."""
        for _, var in self.params:
            if var.grad is not None:
                var.grad[...] = 0

    def update(self):
        """One optimisation step over every parameter that has a gradient."""
        if not self.params:
            raise RuntimeError(f"{type(self).__name__}.update: call setupOn(module) first")
        self.t += 1
        for name, var in self.params:
            if var.grad is None:
                continue
            if tuple(var.grad.shape) != tuple(var.data.shape):
                raise ValueError(f"{type(self).__name__}: gradient of {name!r} has shape {tuple(var.grad.shape)}, "
                                 f"expected {tuple(var.data.shape)}")
            self._step(var.data, var.grad, self.states[name])

    step = update

    def _step(self, data, grad, state):  # pragma: no cover - abstract
        raise NotImplementedError


def _check_rate(cls, name, value, low, high, low_open=False, high_open=True):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{cls}: {name} must be a number in {lo}{low}, {high}{hi}, got {name}={value!r}")
    return float(value)


def _state_dtype(data):
    # float16 parameters keep their moments in float32: a float16 square of a
    # small gradient underflows to zero
    return "float32" if data.dtype == "float16" else data.dtype


class SGD(Optimizer):
    """Stochastic gradient descent with (heavy-ball) momentum, PyTorch's formulation.

    Per parameter ``p`` with gradient ``g`` and velocity ``v`` (zero at start)::

        v <- momRate * v + g
        p <- p - learnRate * v

    ``momRate=0`` is plain SGD.  With a constant learning rate this is the same
    trajectory as the seed framework's ``v <- momRate*v + learnRate*g``.
    """

    def __init__(self, learnRate=1e-2, momRate=0.9):
        super().__init__()
        self.learnRate = _check_rate("SGD", "learnRate", learnRate, 0.0, math.inf, low_open=True)
        self.momRate = _check_rate("SGD", "momRate", momRate, 0.0, 1.0)

    def _step(self, data, grad, state):
        if self.momRate == 0.0:
            if data.dtype == "float16":
                data[...] = (data.astype("float32") - self.learnRate * grad.astype("float32")).astype(data.dtype)
            else:
                data -= self.learnRate * grad
            return
        xp = array_module(data)
        if "v" not in state:
            state["v"] = xp.zeros(data.shape, dtype=_state_dtype(data))
        v = state["v"]
        v *= self.momRate
        v += grad
        if v.dtype == data.dtype:
            data -= self.learnRate * v
        else:
            data[...] = (data.astype(v.dtype) - self.learnRate * v).astype(data.dtype)

    def __repr__(self):
        return f"SGD(learnRate={self.learnRate}, momRate={self.momRate})"


class Adam(Optimizer):
    """Adam (Kingma & Ba), the same arithmetic as ``torch.optim.Adam`` without weight decay.

    Per parameter, at step ``t = 1, 2, ...``, with first/second moments ``m``, ``v``
    (zero at start)::

        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g**2
        p <- p - alpha / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + epsilon)

    ``learnRate`` is an alias of ``alpha``.
    """

    def __init__(self, alpha=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8):
        super().__init__()
        self.alpha = _check_rate("Adam", "alpha", alpha, 0.0, math.inf, low_open=True)
        self.beta1 = _check_rate("Adam", "beta1", beta1, 0.0, 1.0)
        self.beta2 = _check_rate("Adam", "beta2", beta2, 0.0, 1.0)
        self.epsilon = _check_rate("Adam", "epsilon", epsilon, 0.0, math.inf, low_open=True)

    @property
    def learnRate(self):
        return self.alpha

    @learnRate.setter
    def learnRate(self, value):
        self.alpha = _check_rate("Adam", "learnRate", value, 0.0, math.inf, low_open=True)

    def _step(self, data, grad, state):
        xp = array_module(data)
        if "m" not in state:
            state["m"] = xp.zeros(data.shape, dtype=_state_dtype(data))
            state["v"] = xp.zeros(data.shape, dtype=_state_dtype(data))
        m, v = state["m"], state["v"]
        g = grad if grad.dtype == m.dtype else grad.astype(m.dtype)
        m *= self.beta1
        m += (1.0 - self.beta1) * g
        v *= self.beta2
        v += (1.0 - self.beta2) * (g * g)
        bias1 = 1.0 - self.beta1 ** self.t
        bias2 = 1.0 - self.beta2 ** self.t
        denom = xp.sqrt(v) / math.sqrt(bias2) + self.epsilon
        delta = (self.alpha / bias1) * m / denom
        if delta.dtype == data.dtype:
            data -= delta
        else:
            data[...] = (data.astype(delta.dtype) - delta).astype(data.dtype)

    def __repr__(self):
        return f"Adam(alpha={self.alpha}, beta1={self.beta1}, beta2={self.beta2}, epsilon={self.epsilon})"
