"""``Variable``: a parameter array with its gradient, as in the seed framework.

A module's trainable state is a dict of Variables (``module.vars``).  ``data`` is
the parameter itself and ``grad`` the gradient that the module's ``backward``
writes (``scale*new + momentum*old``).  Both are NumPy or CuPy arrays of one
shape, dtype and device.
"""
from __future__ import annotations

from .backend import gpuarray

__all__ = ["Variable"]


def _check_array(a, what):
    if not hasattr(a, "shape") or not hasattr(a, "dtype") or not hasattr(a, "ndim"):
        raise TypeError(f"Variable {what} must be a NumPy or CuPy array, got {what} of type "
                        f"{type(a).__name__} (wrap it with np.asarray or gpuarray.to_gpu)")


class Variable:
    """A parameter (``data``) and its gradient (``grad``).

    ``Variable(data, name=None, withgrad=True, grad=None)``: with ``withgrad`` a
    zero gradient of the same shape, dtype and device is allocated unless ``grad``
    is given; ``withgrad=False`` makes a frozen value (``grad`` stays None and
    optimizers / ``updateParams`` skip it).
    """

    def __init__(self, data, name=None, withgrad=True, grad=None):
        _check_array(data, "data")
        self._data = data
        self.name = name
        self._grad = None
        if grad is not None:
            self.grad = grad
        elif withgrad:
            self._grad = gpuarray.zeros_like(data)

    # ------------------------------------------------------------ data / grad
    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        _check_array(value, "data")
        self._data = value

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, value):
        if value is None:
            self._grad = None
            return
        _check_array(value, "grad")
        if tuple(value.shape) != tuple(self._data.shape) or value.dtype != self._data.dtype:
            raise ValueError(f"Variable grad must match data (shape {tuple(self._data.shape)}, dtype "
                             f"{self._data.dtype}), got grad of shape {tuple(value.shape)}, dtype {value.dtype}")
        if gpuarray.is_device_array(value) != gpuarray.is_device_array(self._data):
            raise TypeError("Variable grad must live on the same device as its data")
        self._grad = value

    @property
    def withgrad(self):
        return self._grad is not None

    # ------------------------------------------------------------ array-like properties
    @property
    def shape(self):
        return tuple(self._data.shape)

    @property
    def dtype(self):
        return self._data.dtype

    @property
    def ndim(self):
        return self._data.ndim

    @property
    def size(self):
        return int(self._data.size)

    @property
    def nbytes(self):
        return int(self._data.nbytes)

    @property
    def on_gpu(self):
        return gpuarray.is_device_array(self._data)

    # ------------------------------------------------------------ helpers
    def zeroGrad(self):
        """Set the gradient to zero in place (allocating it if the Variable had none)."""
        if self._grad is None:
            self._grad = gpuarray.zeros_like(self._data)
        else:
            self._grad[...] = 0

    def astype(self, dtype):
        """Cast data and grad to ``dtype`` in place of the arrays (used by ``calcMode``)."""
        self._data = self._data.astype(dtype)
        if self._grad is not None:
            self._grad = self._grad.astype(dtype)
        return self

    def __repr__(self):
        where = "gpu" if self.on_gpu else "cpu"
        name = f" {self.name!r}" if self.name else ""
        return f"Variable{name}(shape={self.shape}, dtype={self.dtype}, {where}, withgrad={self.withgrad})"
