"""Cost functions in the seed framework's style: ``error, grad = cost(pred, target)``.

A cost is called on a prediction (usually ``net.data``) and a target of the same
shape.  It returns the scalar error as a Python float and the gradient of that
error with respect to ``pred``, an array of ``pred``'s type, shape and dtype,
ready for ``net.backward(grad)``.

Sign convention: ``grad`` is the true derivative ``d error / d pred`` (as in
PyTorch), so an optimizer *subtracts* it, scaled by a learning rate.
"""
from __future__ import annotations

from .engine import array_module

__all__ = ["MSE"]

_FLOAT_DTYPES = ("float16", "float32", "float64")


class MSE:
    """Mean squared error over every element: ``error = mean((pred - target) ** 2)``.

    ``grad = 2 * (pred - target) / pred.size``.  The sum is accumulated in
    float64 whatever the input dtype, so the error of a large batch is not
    rounded away in float32.  Works on NumPy and CuPy arrays alike.

    After a call, ``cost.error`` and ``cost.grad`` hold the last results.
    ``cost.validate(pred, target)`` returns the error only, without allocating
    a gradient (for evaluation).
    """

    def __init__(self):
        self.error = None
        self.grad = None

    @staticmethod
    def _check(pred, target):
        for name, a in (("pred", pred), ("target", target)):
            if not hasattr(a, "shape") or not hasattr(a, "dtype"):
                raise TypeError(f"MSE: {name} must be a NumPy or CuPy array, got {type(a).__name__}")
            if str(a.dtype) not in _FLOAT_DTYPES:
                raise TypeError(f"MSE: {name} must be float16, float32 or float64, got {name}.dtype={a.dtype}")
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(f"MSE: pred and target must have the same shape, got pred.shape={tuple(pred.shape)} "
                             f"and target.shape={tuple(target.shape)}")
        if array_module(pred) is not array_module(target):
            raise TypeError("MSE: pred and target must live on one device (both NumPy or both CuPy), got "
                            f"{type(pred).__module__}.{type(pred).__name__} and "
                            f"{type(target).__module__}.{type(target).__name__}")
        if pred.size == 0:
            raise ValueError(f"MSE: pred must not be empty, got pred.shape={tuple(pred.shape)}")

    def _diff(self, pred, target):
        self._check(pred, target)
        return pred - target.astype(pred.dtype, copy=False)

    def __call__(self, pred, target):
        diff = self._diff(pred, target)
        self.error = float((diff.astype("float64") ** 2).sum() / diff.size)
        if diff.dtype == "float16":  # 2/size can underflow float16 for big batches
            self.grad = (diff.astype("float32") * (2.0 / diff.size)).astype(diff.dtype)
        else:
            self.grad = diff * (2.0 / diff.size)
        return self.error, self.grad

    def validate(self, pred, target):
        diff = self._diff(pred, target)
        self.error = float((diff.astype("float64") ** 2).sum() / diff.size)
        return self.error

    def __repr__(self):
        return "MSE()"
