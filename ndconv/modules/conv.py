"""Convolution layers of the seed framework: ``ConvND``/``DeconvND`` and their 1-D/2-D/3-D forms.

Each layer is a thin shell over :mod:`ndconv.functional`: it owns ``W``
(``(outmaps, inmaps/groups, *k)`` for convolution, ``(inmaps, outmaps/groups, *k)``
for the transposed one) and ``b`` (``(1, outmaps, 1, ...)``, zeros at creation),
checks its hyper-parameters at construction and the data shape before any work.
"""
from __future__ import annotations

import numbers

import numpy as np

from .. import functional as F
from ..backend import gpuarray
from ..engine import get_engine
from ..geometry import PADDING_MODES, conv_geometry, conv_transpose_geometry, int_tuple
from ..init import create_tensor, parse_scheme
from ..variable import Variable
from .module import Module

__all__ = ["ConvND", "Conv1D", "Conv2D", "Conv3D", "DeconvND", "Deconv1D", "Deconv2D", "Deconv3D"]


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _positive_int(value, name):
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {name}={value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {name}={value}")
    return int(value)


def _pad_pairs(pad, nd):
    """int, ``nd`` ints or ``nd`` (lo, hi) pairs -> tuple of ``nd`` (lo, hi) pairs."""
    if _is_int(pad):
        pairs = ((int(pad), int(pad)),) * nd
    elif isinstance(pad, (tuple, list)) and len(pad) == nd and all(_is_int(p) for p in pad):
        pairs = tuple((int(p), int(p)) for p in pad)
    elif isinstance(pad, (tuple, list)) and len(pad) == nd and all(
            isinstance(p, (tuple, list)) and len(p) == 2 and all(_is_int(v) for v in p) for p in pad):
        pairs = tuple((int(p[0]), int(p[1])) for p in pad)
    else:
        raise TypeError(f"pad must be an int, {nd} ints or {nd} (lo, hi) pairs, got pad={pad!r}")
    if any(v < 0 for p in pairs for v in p):
        raise ValueError(f"pad must be non-negative, got pad={pad!r}")
    return pairs


class _ConvLayer(Module):
    transposed = False
    optionalParams = ("W", "b")

    def __init__(self, nd, inmaps, outmaps, size, stride, pad, dilation, wscale, useBias, name,
                 initscheme, empty, groups, postpad=0, rng=None, padding_mode="zeros"):
        super().__init__(name)
        if not _is_int(nd) or nd not in (1, 2, 3):
            raise ValueError(f"nd must be 1, 2 or 3, got nd={nd!r}")
        self.nd = nd = int(nd)
        self.inmaps = _positive_int(inmaps, "inmaps")
        self.outmaps = _positive_int(outmaps, "outmaps")
        self.groups = _positive_int(groups, "groups")
        if self.inmaps % self.groups or self.outmaps % self.groups:
            raise ValueError(f"inmaps={inmaps} and outmaps={outmaps} must both be divisible by groups={groups}")
        self.size = int_tuple(size, nd, "size", 1)
        self.stride = int_tuple(stride, nd, "stride", 1)
        self.dilation = int_tuple(dilation, nd, "dilation", 1)
        self.pad = _pad_pairs(pad, nd)
        self.postpad = int_tuple(postpad, nd, "postpad", 0)
        for p, s, d in zip(self.postpad, self.stride, self.dilation):
            if p >= max(s, d):
                raise ValueError(f"postpad must be smaller than either stride or dilation, got "
                                 f"postpad={postpad}, stride={stride}, dilation={dilation}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got padding_mode={padding_mode!r}")
        if self.transposed and padding_mode != "zeros":
            raise ValueError(f"Only 'zeros' padding mode is supported for transposed convolution, "
                             f"got padding_mode={padding_mode!r}")
        self.padding_mode = padding_mode
        if not isinstance(useBias, (bool, np.bool_)):
            raise TypeError(f"useBias must be a bool, got useBias={useBias!r}")
        if not isinstance(empty, (bool, np.bool_)):
            raise TypeError(f"empty must be a bool, got empty={empty!r}")
        self.useBias = bool(useBias)
        self.initscheme = parse_scheme(initscheme)
        self.wscale = wscale
        if self.transposed:
            self.wshape = (self.inmaps, self.outmaps // self.groups) + self.size
        else:
            self.wshape = (self.outmaps, self.inmaps // self.groups) + self.size
        self.bshape = (1, self.outmaps) + (1,) * nd
        if not empty:
            w = create_tensor(self.wshape, initscheme, wscale, transposed=self.transposed, rng=rng)
            self.setVar("W", Variable(gpuarray.to_gpu(w)))
            if self.useBias:
                self.setVar("b", Variable(gpuarray.zeros(self.bshape, dtype=np.float32)))
        elif not isinstance(wscale, (int, float, np.number)) or isinstance(wscale, bool):
            raise ValueError(f"wscale must be a number, got wscale={wscale!r}")

    # ------------------------------------------------------------ parameters
    def paramSpecs(self):
        dt = self.calctype if self.calctype is not None else np.dtype(np.float32)
        specs = {"W": (self.wshape, dt)}
        if self.useBias:
            specs["b"] = (self.bshape, dt)
        return specs

    def _weights(self):
        if "W" not in self.vars:
            raise RuntimeError(f"{self._what()}: W is not set (the layer was built with empty=True); "
                               f"call setVar('W', Variable(...)) or load(path) first")
        b = self.vars.get("b")
        if self.useBias and b is None:
            raise RuntimeError(f"{self._what()}: b is not set (the layer was built with empty=True); "
                               f"call setVar('b', Variable(...)) or load(path) first")
        return self.vars["W"].data, (None if b is None else b.data.reshape(-1))

    def _paramDtype(self):
        if self.calctype is not None:
            return self.calctype
        if "W" in self.vars:
            return np.dtype(self.vars["W"].dtype)
        return np.dtype(np.float32)

    # ------------------------------------------------------------ shapes
    @property
    def _op(self):
        return type(self).__name__

    def geometry(self, shape):
        """The :class:`ndconv.geometry.ConvGeometry` of a forward call on data of ``shape``."""
        shape = tuple(shape)
        if len(shape) != self.nd + 2:
            raise ValueError(f"{self._what()}: data must be {self.nd + 2}-D (batch, maps, "
                             f"{self.nd} spatial dims), got data of shape {shape}")
        try:
            if self.transposed:
                geom, _ = conv_transpose_geometry(shape, self.wshape, None, self.stride, self.pad,
                                                  self.postpad, self.groups, self.dilation, None, None,
                                                  op=self._op)
            else:
                geom, _ = conv_geometry(shape, self.wshape, None, self.stride, self.pad, self.dilation,
                                        self.groups, self.padding_mode, None, op=self._op)
        except ValueError as e:
            raise ValueError(f"{self._what()}: {e}") from e
        return geom

    def checkDataShape(self, shape):
        self.geometry(shape)

    def dataShapeFrom(self, shape):
        g = self.geometry(shape)
        return g.x_shape if self.transposed else g.y_shape

    def gradShapeFrom(self, shape):
        """Input shape for an output (gradient) of ``shape``; for a strided convolution
        several input sizes give one output size and the smallest is returned."""
        shape = tuple(shape)
        if len(shape) != self.nd + 2:
            raise ValueError(f"{self._what()}: grad must be {self.nd + 2}-D, got grad of shape {shape}")
        if shape[1] != self.outmaps:
            raise ValueError(f"{self._what()}: grad must have {self.outmaps} maps, got grad of shape {shape}")
        out = []
        for n, k, s, d, (lo, hi), op in zip(shape[2:], self.size, self.stride, self.dilation, self.pad,
                                            self.postpad):
            if self.transposed:
                out.append((n + lo + hi - d * (k - 1) - 1 - op) // s + 1)
            else:
                out.append((n - 1) * s - lo - hi + d * (k - 1) + 1)
        if any(v <= 0 for v in out):
            raise ValueError(f"{self._what()}: no input gives an output of shape {shape}")
        return (shape[0], self.inmaps) + tuple(out)

    # ------------------------------------------------------------ compute
    def updateData(self, data):
        W, b = self._weights()
        if self.transposed:
            self.data = F.conv_transpose_nd(data, W, b, self.stride, self.pad, self.postpad, self.groups,
                                            self.dilation, op=self._op)
        else:
            self.data = F.conv_nd(data, W, b, self.stride, self.pad, self.dilation, self.groups,
                                  padding_mode=self.padding_mode, op=self._op)

    def _backward(self, grad, needs):
        W, _ = self._weights()
        return F.conv_backward(grad, self.inData, W, self.stride, self.pad, self.dilation, self.groups,
                               transposed=self.transposed, output_padding=self.postpad,
                               padding_mode=self.padding_mode, needs=needs)

    def updateGrad(self, grad):
        self.grad = self._backward(grad, ("input",))[0]

    def accGradParams(self, grad, scale=1.0, momentum=0.0):
        W, b = self.vars.get("W"), self.vars.get("b")
        needs = tuple(n for n, v in (("weight", W), ("bias", b)) if v is not None and v.grad is not None)
        if not needs:
            return
        _, gw, gb = self._backward(grad, needs)
        if gw is not None:
            _accumulate(W, gw, scale, momentum)
        if gb is not None:
            _accumulate(b, gb.reshape(self.bshape), scale, momentum)

    def optimizeForShape(self, shape):
        """Check ``shape`` and let the engine pick its fastest algorithm for it.

        Calls ``engine.optimize(geometry, dtype)`` when the engine of the
        parameters' device has such a method (engines that have a single
        algorithm do not), and returns the geometry.
        """
        geom = self.geometry(tuple(shape))
        W = self.vars["W"].data if "W" in self.vars else gpuarray.empty((0,), dtype=self._paramDtype())
        optimize = getattr(get_engine(W), "optimize", None)
        if callable(optimize):
            optimize(geom, self._paramDtype())
        return geom

    def __repr__(self):
        args = [f"{self.inmaps}", f"{self.outmaps}", f"size={self.size}"]
        for key, default in (("stride", (1,) * self.nd), ("dilation", (1,) * self.nd),
                             ("postpad", (0,) * self.nd)):
            if getattr(self, key) != default:
                args.append(f"{key}={getattr(self, key)}")
        if any(v for p in self.pad for v in p):
            args.append(f"pad={self.pad}")
        if self.padding_mode != "zeros":
            args.append(f"padding_mode={self.padding_mode!r}")
        if self.groups != 1:
            args.append(f"groups={self.groups}")
        if not self.useBias:
            args.append("useBias=False")
        if self.name:
            args.append(f"name={self.name!r}")
        return f"{type(self).__name__}({', '.join(args)})"


def _accumulate(var, new, scale, momentum):
    """var.grad = scale*new + momentum*old, in place; momentum 0 overwrites."""
    if momentum == 0:
        if scale == 1:
            var.grad[...] = new
        else:
            var.grad[...] = new * var.dtype.type(scale)
    else:
        var.grad *= var.dtype.type(momentum)
        var.grad += new * var.dtype.type(scale) if scale != 1 else new


class ConvND(_ConvLayer):
    """N-d convolution layer (cross-correlation), ``nd`` in 1..3.

    ``ConvND(nd, inmaps, outmaps, size, stride=1, pad=0, dilation=1, wscale=1.0,
    useBias=True, name=None, initscheme=None, empty=False, groups=1, *, rng=None,
    padding_mode="zeros")``.  ``size``, ``stride``, ``dilation``: an int or one
    per spatial dim; ``pad``: an int, one per dim, or ``(lo, hi)`` pairs.
    ``padding_mode`` ('zeros', 'reflect', 'replicate', 'circular') is an
    ndconv extension.  Output size per dim: ``(in + lo + hi - d(k-1) - 1) // s + 1``.
    """

    transposed = False

    def __init__(self, nd, inmaps, outmaps, size, stride=1, pad=0, dilation=1, wscale=1.0, useBias=True,
                 name=None, initscheme=None, empty=False, groups=1, *, rng=None, padding_mode="zeros"):
        super().__init__(nd, inmaps, outmaps, size, stride, pad, dilation, wscale, useBias, name,
                         initscheme, empty, groups, 0, rng, padding_mode)


class Conv1D(ConvND):
    """1-D convolution: data ``(N, inmaps, L)``."""

    def __init__(self, inmaps, outmaps, size, stride=1, pad=0, dilation=1, wscale=1.0, useBias=True,
                 name=None, initscheme=None, empty=False, groups=1, *, rng=None, padding_mode="zeros"):
        super().__init__(1, inmaps, outmaps, size, stride, pad, dilation, wscale, useBias, name,
                         initscheme, empty, groups, rng=rng, padding_mode=padding_mode)


class Conv2D(ConvND):
    """2-D convolution: data ``(N, inmaps, H, W)``."""

    def __init__(self, inmaps, outmaps, size, stride=1, pad=0, dilation=1, wscale=1.0, useBias=True,
                 name=None, initscheme=None, empty=False, groups=1, *, rng=None, padding_mode="zeros"):
        super().__init__(2, inmaps, outmaps, size, stride, pad, dilation, wscale, useBias, name,
                         initscheme, empty, groups, rng=rng, padding_mode=padding_mode)


class Conv3D(ConvND):
    """3-D convolution: data ``(N, inmaps, D, H, W)``."""

    def __init__(self, inmaps, outmaps, size, stride=1, pad=0, dilation=1, wscale=1.0, useBias=True,
                 name=None, initscheme=None, empty=False, groups=1, *, rng=None, padding_mode="zeros"):
        super().__init__(3, inmaps, outmaps, size, stride, pad, dilation, wscale, useBias, name,
                         initscheme, empty, groups, rng=rng, padding_mode=padding_mode)


class DeconvND(_ConvLayer):
    """N-d transposed convolution layer (the gradient of ConvND with respect to its input).

    Same arguments as :class:`ConvND` plus keyword-only ``postpad`` (output
    padding, smaller than stride or dilation).  Output size per dim:
    ``(in - 1)s - lo - hi + d(k-1) + 1 + postpad``.  ``W`` is
    ``(inmaps, outmaps/groups, *k)``; fans for the init schemes are swapped
    accordingly.
    """

    transposed = True

    def __init__(self, nd, inmaps, outmaps, size, stride=1, pad=0, dilation=1, wscale=1.0, useBias=True,
                 name=None, initscheme=None, empty=False, groups=1, *, postpad=0, rng=None):
        super().__init__(nd, inmaps, outmaps, size, stride, pad, dilation, wscale, useBias, name,
                         initscheme, empty, groups, postpad, rng)


class Deconv1D(DeconvND):
    """1-D transposed convolution: data ``(N, inmaps, L)``."""

    def __init__(self, inmaps, outmaps, size, stride=1, pad=0, dilation=1, wscale=1.0, useBias=True,
                 name=None, initscheme=None, empty=False, groups=1, *, postpad=0, rng=None):
        super().__init__(1, inmaps, outmaps, size, stride, pad, dilation, wscale, useBias, name,
                         initscheme, empty, groups, postpad=postpad, rng=rng)


class Deconv2D(DeconvND):
    """2-D transposed convolution: data ``(N, inmaps, H, W)``."""

    def __init__(self, inmaps, outmaps, size, stride=1, pad=0, dilation=1, wscale=1.0, useBias=True,
                 name=None, initscheme=None, empty=False, groups=1, *, postpad=0, rng=None):
        super().__init__(2, inmaps, outmaps, size, stride, pad, dilation, wscale, useBias, name,
                         initscheme, empty, groups, postpad=postpad, rng=rng)


class Deconv3D(DeconvND):
    """3-D transposed convolution: data ``(N, inmaps, D, H, W)``."""

    def __init__(self, inmaps, outmaps, size, stride=1, pad=0, dilation=1, wscale=1.0, useBias=True,
                 name=None, initscheme=None, empty=False, groups=1, *, postpad=0, rng=None):
        super().__init__(3, inmaps, outmaps, size, stride, pad, dilation, wscale, useBias, name,
                         initscheme, empty, groups, postpad=postpad, rng=rng)
