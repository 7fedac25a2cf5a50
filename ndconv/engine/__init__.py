"""Engines: one per array library, each with the same three primitives.

``forward(x, w, g)``          y  = conv(x, w)              (N, Cy, *y_size)
``backward_input(gy, w, g)``  gx = conv^T(gy, w)           (N, Cx, *x_size)
``backward_weight(x, gy, g)`` gw = d<y, gy>/dw             (Cy, Cx/G, *kernel)

``g`` is a :class:`ndconv.geometry.ConvGeometry` with zero padding mode; arrays
arrive channels-first and batched, of one float dtype, with any strides; results
are new arrays of that dtype (float16 accumulates in float32).
"""
import numpy as np

_engines = {}


def _is_cupy(a):
    return type(a).__module__.split(".")[0] == "cupy"


def array_module(a):
    if _is_cupy(a):
        import cupy
        return cupy
    return np


def get_engine(*arrays):
    """The engine for these arrays: NumPy -> CPU, CuPy -> GPU; mixing them is an error."""
    present = [a for a in arrays if a is not None]
    kinds = {("cupy" if _is_cupy(a) else "numpy") for a in present}
    if len(kinds) > 1:
        names = ", ".join(f"{type(a).__module__}.{type(a).__name__}" for a in present)
        raise TypeError(f"all arrays must live on one device (all NumPy or all CuPy), got {names}")
    kind = kinds.pop() if kinds else "numpy"
    if kind not in _engines:
        if kind == "cupy":
            from .gpu import GPUEngine
            _engines[kind] = GPUEngine()
        else:
            from .cpu import CPUEngine
            _engines[kind] = CPUEngine()
    return _engines[kind]


def cpu_engine():
    return get_engine(np.empty(0))
