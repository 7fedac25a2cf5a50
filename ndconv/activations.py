"""Element-wise activations as parameter-free modules: ``ReLU``, ``Sigmoid``, ``Tanh``.

They follow the :class:`ndconv.modules.Module` life cycle: ``act(data)`` stores
and returns ``act.data``; ``act.backward(grad)`` stores ``act.grad``, the
gradient with respect to the input.  Any float dtype, any shape, NumPy or CuPy
arrays; the input is never modified (each call allocates its output).
"""
from __future__ import annotations

from .backend.gpuarray import array_module
from .modules.module import Module

__all__ = ["ReLU", "Sigmoid", "Tanh"]


class ReLU(Module):
    """``max(x, 0)``; its gradient is taken as 0 at ``x == 0`` (as in PyTorch)."""

    def updateData(self, data):
        xp = array_module(data)
        self.data = xp.maximum(data, data.dtype.type(0))

    def updateGrad(self, grad):
        # multiply by the mask (not where()) so a NaN in grad still propagates where x > 0
        self.grad = grad * (self.inData > 0).astype(grad.dtype)


class Sigmoid(Module):
    """``1 / (1 + exp(-x))``, computed without overflow for large ``|x|``."""

    def updateData(self, data):
        xp = array_module(data)
        # exp of a non-positive number never overflows; both branches are exact rewrites
        e = xp.exp(-xp.abs(data))
        one = data.dtype.type(1)
        self.data = xp.where(data >= 0, one / (one + e), e / (one + e)).astype(data.dtype, copy=False)

    def updateGrad(self, grad):
        y = self.data
        self.grad = grad * y * (y.dtype.type(1) - y)


class Tanh(Module):
    """Hyperbolic tangent; its gradient is ``1 - tanh(x)**2``, read from the output."""

    def updateData(self, data):
        self.data = array_module(data).tanh(data)

    def updateGrad(self, grad):
        y = self.data
        self.grad = grad * (y.dtype.type(1) - y * y)
