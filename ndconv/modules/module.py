"""The ``Module`` base class: the seed framework's life cycle over ndconv arrays."""
from __future__ import annotations

import numpy as np

from ..backend import gpuarray
from ..variable import Variable

__all__ = ["Module", "CALC_DTYPES"]

CALC_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _shape_of(a):
    return tuple(int(s) for s in a.shape)


class Module:
    """Base class of every layer and container.

    Life cycle (what users call)
    ----------------------------
    ``y = mod(data)``
        Runs ``forward``: checks the data (``checkDataShape``, ``checkDataType``),
        stores it as ``mod.inData``, computes ``mod.data`` and returns it.
    ``mod.backward(grad, updParamGrads=True, updGrad=True, scale=1.0, momentum=0.0)``
        ``grad`` is dL/d(mod.data).  Stores dL/d(input) in ``mod.grad`` (unless
        ``updGrad=False``) and writes the parameter gradients into
        ``mod.vars[name].grad`` as ``scale * new + momentum * old``.  The defaults
        (scale 1, momentum 0) *overwrite* the previous gradients; pass
        ``momentum=1.0`` to accumulate over several backward calls.
    ``mod.updateParams(lr)``
        One plain gradient-descent step: ``var.data -= lr * var.grad`` for every
        Variable that has a gradient.  Gradients are true derivatives of the loss,
        so a positive ``lr`` decreases it.
    ``zeroGradParams()``, ``vars``, ``setVar(name, var)``, ``getVar(name)``,
    ``trainMode()``/``evalMode()`` (sets ``mod.train``), ``calcMode(dtype)``,
    ``dataShapeFrom(shape)``/``gradShapeFrom(shape)`` (shape arithmetic without
    data), ``checkDataShape(shape)``/``checkGradShape(shape)`` (raise ValueError),
    ``optimizeForShape(shape)``, ``save(path)``/``load(path)`` (HDF5).

    Subclass contract (what a new module implements)
    ------------------------------------------------
    Call ``super().__init__(name)`` first.  Then:

    * ``updateData(self, data)`` -- REQUIRED.  Compute the output from ``data``
      and assign it to ``self.data``.  ``self.inData`` is already set.
    * ``updateGrad(self, grad)`` -- REQUIRED for anything that is trained through.
      Compute dL/d(input) from ``grad`` (and ``self.inData``/``self.data``) and
      assign it to ``self.grad``.
    * ``dataShapeFrom(self, shape)`` / ``gradShapeFrom(self, shape)`` -- override
      when the output shape differs from the input shape (default: identity).
    * ``checkDataShape(self, shape)`` -- override to reject bad input shapes with
      a ValueError naming the shape (default: accepts everything).
      ``checkGradShape`` by default requires the shape of the last ``self.data``.
    * Modules with parameters register them with
      ``self.setVar(name, Variable(array))`` (this also makes ``self.<name>``
      read the array) and implement
      ``accGradParams(self, grad, scale, momentum)``, which must set every
      ``var.grad`` to ``scale * new + momentum * old`` (overwrite when momentum is
      0, so stale NaNs never leak).  ``paramSpecs()`` may be overridden to declare
      parameters that are not allocated yet (``empty=True``), so ``load`` can fill
      them.
    * ``checkDataType(self, dtype)``: by default data must have the parameters'
      dtype (or the ``calcMode`` dtype when set); parameter-free modules accept
      any float dtype unless ``calcMode`` was called.

    A parameter-free module such as ReLU therefore overrides only ``updateData``
    and ``updateGrad``.
    """

    optionalParams = ()   # parameter names that read as None while unset

    def __init__(self, name=None):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"module name must be a str or None, got name={name!r}")
        if name is not None and ("." in name or "/" in name or not name):
            raise ValueError(f"module name must be non-empty and contain no '.' or '/', got name={name!r}")
        self.__dict__["vars"] = {}    # containers shadow this with a property
        self.name = name
        self.train = True
        self.calctype = None          # set by calcMode; None = follow the parameters
        self.data = None
        self.grad = None
        self.inData = None

    # ------------------------------------------------------------ attribute access to parameters
    def __getattr__(self, item):
        # Only called when normal lookup fails: expose parameters as attributes (conv.W).
        vars_ = self.__dict__.get("vars")
        if vars_ is not None and item in vars_:
            return vars_[item].data
        if item in type(self).optionalParams:
            return None          # a declared parameter not allocated (empty=True, useBias=False)
        raise AttributeError(f"{type(self).__name__!s} object has no attribute {item!r}")

    def __setattr__(self, key, value):
        vars_ = self.__dict__.get("vars")
        if vars_ is not None and key in vars_ and not isinstance(value, Variable):
            # conv.W = array replaces the parameter's values, checked like setVar.
            self.setVar(key, Variable(value))
            return
        object.__setattr__(self, key, value)

    # ------------------------------------------------------------ forward / backward
    def __call__(self, data):
        return self.forward(data)

    def forward(self, data):
        if not hasattr(data, "shape") or not hasattr(data, "dtype"):
            raise TypeError(f"{self._what()}: data must be a NumPy or CuPy array, got {type(data).__name__}")
        self.checkDataShape(_shape_of(data))
        self.checkDataType(data.dtype)
        self._checkDevice(data, "data")
        self.inData = data
        self.updateData(data)
        return self.data

    def backward(self, grad, updParamGrads=True, updGrad=True, scale=1.0, momentum=0.0):
        if self.inData is None:
            raise RuntimeError(f"{self._what()}: backward called before forward")
        if not hasattr(grad, "shape") or not hasattr(grad, "dtype"):
            raise TypeError(f"{self._what()}: grad must be a NumPy or CuPy array, got {type(grad).__name__}")
        self.checkGradShape(_shape_of(grad))
        if grad.dtype != self.inData.dtype:
            raise TypeError(f"{self._what()}: grad dtype must match the data dtype {self.inData.dtype}, "
                            f"got grad.dtype={grad.dtype}")
        self._checkDevice(grad, "grad")
        if updGrad:
            self.updateGrad(grad)
        else:
            self.grad = None
        if updParamGrads and self.trainableVars():
            self.accGradParams(grad, scale, momentum)
        return self.grad

    def updateData(self, data):
        raise NotImplementedError(f"{type(self).__name__} must implement updateData(data)")

    def updateGrad(self, grad):
        raise NotImplementedError(f"{type(self).__name__} must implement updateGrad(grad)")

    def accGradParams(self, grad, scale=1.0, momentum=0.0):
        raise NotImplementedError(f"{type(self).__name__} has parameters but does not implement "
                                  f"accGradParams(grad, scale, momentum)")

    # ------------------------------------------------------------ shapes
    def dataShapeFrom(self, shape):
        return tuple(shape)

    def gradShapeFrom(self, shape):
        return tuple(shape)

    def checkDataShape(self, shape):
        pass

    def checkGradShape(self, shape):
        if self.data is not None and tuple(shape) != _shape_of(self.data):
            raise ValueError(f"{self._what()}: grad must have the output's shape {_shape_of(self.data)}, "
                             f"got grad of shape {tuple(shape)}")

    def checkDataType(self, dtype):
        dtype = np.dtype(dtype)
        want = self._paramDtype()
        if want is not None and dtype != want:
            hint = "" if self.calctype is not None else f" (or call calcMode(np.{dtype}))"
            raise TypeError(f"{self._what()}: data dtype must be {want}, the module's calc type, got "
                            f"data.dtype={dtype}; cast the data{hint}")
        if dtype not in CALC_DTYPES:
            raise TypeError(f"{self._what()}: data must be float16, float32 or float64, got data.dtype={dtype}")

    def _paramDtype(self):
        if self.calctype is not None:
            return self.calctype
        for var in self.vars.values():
            return np.dtype(var.dtype)
        return None

    def _checkDevice(self, a, what):
        on_gpu = gpuarray.is_device_array(a)
        for name, var in self.vars.items():
            if var.on_gpu != on_gpu:
                where = ("GPU", "host") if on_gpu else ("host", "GPU")
                raise TypeError(f"{self._what()}: {what} is on the {where[0]} but parameter {name!r} is on the "
                                f"{where[1]}; move the data with gpuarray.to_gpu/to_host or the module with "
                                f"moveTo('cpu'|'gpu')")

    # ------------------------------------------------------------ parameters
    def setVar(self, name, var):
        """Set parameter ``name`` (a Variable, or an array that gets wrapped)."""
        if not isinstance(var, Variable):
            var = Variable(var)
        self.checkVar(name, var)
        self.vars[name] = var
        if var.name is None:
            var.name = name

    def getVar(self, name):
        try:
            return self.vars[name]
        except KeyError:
            raise KeyError(f"{self._what()} has no parameter {name!r}; it has {sorted(self.vars)}") from None

    def checkVar(self, name, var):
        """Validate a Variable before ``setVar`` stores it (shape/dtype/device)."""
        if not isinstance(name, str) or not name or "." in name or "/" in name:
            raise ValueError(f"parameter name must be a non-empty str without '.' or '/', got name={name!r}")
        specs = self.paramSpecs()
        if specs and name not in specs:
            raise KeyError(f"{self._what()} has no parameter {name!r}; it has {sorted(specs)}")
        if name in specs:
            shape, dtype = specs[name]
            if tuple(var.shape) != tuple(shape):
                raise ValueError(f"{self._what()}: parameter {name!r} must have shape {tuple(shape)}, "
                                 f"got shape {tuple(var.shape)}")
            if dtype is not None and np.dtype(var.dtype) != np.dtype(dtype):
                raise TypeError(f"{self._what()}: parameter {name!r} must have dtype {np.dtype(dtype)}, "
                                f"got dtype {var.dtype}")
        for other, v in self.vars.items():
            if other != name and v.on_gpu != var.on_gpu:
                raise TypeError(f"{self._what()}: parameter {name!r} must live on the same device as "
                                f"{other!r} ({'GPU' if v.on_gpu else 'host'})")

    def paramSpecs(self):
        """``{name: (shape, dtype)}`` of every parameter this module has or expects."""
        return {name: (var.shape, var.dtype) for name, var in self.vars.items()}

    def trainableVars(self):
        return {name: var for name, var in self.vars.items() if var.grad is not None}

    def namedVars(self, prefix=""):
        """``{dotted name: Variable}`` of this module and (for containers) its children."""
        return {prefix + name: var for name, var in self.vars.items()}

    def zeroGradParams(self):
        for var in self.vars.values():
            if var.grad is not None:
                var.grad[...] = 0

    def updateParams(self, learnRate):
        """Gradient-descent step: ``data -= learnRate * grad`` for each Variable with a gradient."""
        for var in self.trainableVars().values():
            var.data -= var.data.dtype.type(learnRate) * var.grad

    # ------------------------------------------------------------ modes
    def trainMode(self):
        self.train = True
        return self

    def evalMode(self):
        self.train = False
        return self

    def calcMode(self, T):
        """Compute in dtype ``T`` (float16, float32 or float64): parameters are cast,
        and data passed afterwards must already have that dtype."""
        try:
            dt = np.dtype(T)
        except TypeError:
            raise TypeError(f"calcMode expects a float dtype, got T={T!r}") from None
        if dt not in CALC_DTYPES:
            raise TypeError(f"calcMode supports float16, float32 and float64, got T={dt}")
        for var in self.vars.values():
            if var.dtype != dt:
                var.astype(dt)
        self.calctype = dt
        self.data = self.grad = self.inData = None
        return self

    def moveTo(self, device):
        """Move the parameters to ``'gpu'`` (when present) or ``'cpu'``."""
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got device={device!r}")
        move = gpuarray.to_gpu if device == "gpu" else gpuarray.to_host
        for var in self.vars.values():
            grad = var.grad
            var._data = move(var.data) if device == "gpu" else gpuarray.to_host(var.data).copy()
            if grad is not None:
                var._grad = move(grad) if device == "gpu" else gpuarray.to_host(grad).copy()
        self.data = self.grad = self.inData = None
        return self

    def optimizeForShape(self, shape):
        """Prepare for inputs of ``shape``: checks it; layers backed by an engine
        also ask the engine to pick its fastest algorithm (see ConvND)."""
        self.checkDataShape(tuple(shape))

    # ------------------------------------------------------------ persistence
    def save(self, path):
        """Write the parameters to an HDF5 file (atomically), keyed by dotted names."""
        from ..serialization import save_params
        save_params(self, path)

    def load(self, path):
        """Read parameters written by ``save``; checks names, shapes and dtypes first."""
        from ..serialization import load_params
        load_params(self, path)
        return self

    # ------------------------------------------------------------ misc
    def reset(self):
        """Drop the stored data, gradient and input (frees memory between passes)."""
        self.data = self.grad = self.inData = None

    def _what(self):
        return f"{type(self).__name__}" + (f" {self.name!r}" if self.name else "")

    def __repr__(self):
        return self._what()
