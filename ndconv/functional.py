"""The functional API, with PyTorch's signatures and semantics.

Every function checks its arguments through :mod:`ndconv.geometry`, brings the
arrays to the canonical (N, C, *spatial) form as views, and calls the engine's
three primitives: ``forward`` (conv), ``backward_input`` (its transpose) and
``backward_weight``.  A transposed convolution is the same three primitives with
the roles of ``x`` and ``y`` swapped.
"""
from __future__ import annotations

import numpy as np

from . import padding as _pad
from .engine import array_module, get_engine
from .geometry import conv_geometry, conv_transpose_geometry

__all__ = ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
           "conv_nd", "conv_transpose_nd", "conv_backward"]

_FLOAT_DTYPES = ("float16", "float32", "float64")
_FLOATS = frozenset(np.dtype(n) for n in _FLOAT_DTYPES)


def _check_arrays(op, input, weight, bias=None):
    """Type checks shared by every entry point; returns the engine for these arrays."""
    for name, a in (("input", input), ("weight", weight), ("bias", bias)):
        if a is None and name == "bias":
            continue
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{op}: {name} must be a NumPy or CuPy array, got {type(a).__name__}")
        if a.dtype not in _FLOATS:
            raise TypeError(f"{op}: {name} must be float16, float32 or float64, got {name}.dtype={a.dtype}")
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != input.dtype):
        raise TypeError(f"{op}: input, weight and bias must have the same dtype, got input {input.dtype}, "
                        f"weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else ""))
    return get_engine(input, weight, bias)


def _to_canonical(xp, a, layout):
    """(N?, C, *s) or (N?, *s, C) -> (N, C, *s), a view."""
    if layout.unbatched:
        a = a[None]
    if layout.channels_last:
        a = xp.moveaxis(a, -1, 1)
    return a


def _from_canonical(xp, a, layout):
    if layout.channels_last:
        a = xp.moveaxis(a, 1, -1)
    if layout.unbatched:
        a = a[0]
    return a


def _add_bias(y, bias):
    if bias is not None:
        y += bias.reshape((1, -1) + (1,) * (y.ndim - 2))
    return y


def _bias_grad(xp, grad):
    axes = (0,) + tuple(range(2, grad.ndim))
    acc = "float32" if grad.dtype == xp.float16 else grad.dtype
    return grad.sum(axis=axes, dtype=acc).astype(grad.dtype)


def conv_nd(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
            padding_mode="zeros", data_format=None, op="conv"):
    """N-d convolution (cross-correlation); the dimension count follows ``weight``."""
    engine = _check_arrays(op, input, weight, bias)
    geom, layout = conv_geometry(input.shape, weight.shape, None if bias is None else bias.shape,
                                 stride, padding, dilation, groups, padding_mode, data_format, op)
    xp = array_module(input)
    x = _to_canonical(xp, input, layout)
    if geom.padding_mode != "zeros":
        x = _pad.pad(xp, x, geom.pad_lo, geom.pad_hi, geom.padding_mode)
        geom = geom.with_zero_padding()
    y = engine.forward(x, weight, geom)
    return _from_canonical(xp, _add_bias(y, bias), layout)


def conv_transpose_nd(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                      dilation=1, *, output_size=None, data_format=None, padding_mode="zeros",
                      op="conv_transpose"):
    """N-d transposed convolution: the gradient of ``conv_nd`` with respect to its input."""
    engine = _check_arrays(op, input, weight, bias)
    if padding_mode != "zeros":
        raise ValueError(f"Only 'zeros' padding mode is supported for {op}, got padding_mode={padding_mode!r}")
    geom, layout = conv_transpose_geometry(input.shape, weight.shape, None if bias is None else bias.shape,
                                           stride, padding, output_padding, groups, dilation, output_size,
                                           data_format, op)
    xp = array_module(input)
    y = _to_canonical(xp, input, layout)
    x = engine.backward_input(y, weight, geom)
    return _from_canonical(xp, _add_bias(x, bias), layout)


def conv_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1, *,
                  transposed=False, output_padding=0, output_size=None, padding_mode="zeros",
                  data_format=None, needs=("input", "weight", "bias")):
    """Gradients of ``conv_nd`` (or of ``conv_transpose_nd`` when ``transposed``).

    Returns ``(grad_input, grad_weight, grad_bias)``, with ``None`` for what ``needs``
    does not name.  ``input`` is the forward call's input, ``grad_output`` the
    gradient of its output, both in the caller's layout.
    """
    op = "conv_transpose_backward" if transposed else "conv_backward"
    engine = _check_arrays(op, input, weight)
    _check_arrays(op, grad_output, weight)
    unknown = set(needs) - {"input", "weight", "bias"}
    if unknown:
        raise ValueError(f"needs may only name 'input', 'weight' and 'bias', got needs={tuple(needs)}")
    xp = array_module(input)
    if transposed:
        if padding_mode != "zeros":
            raise ValueError(f"Only 'zeros' padding mode is supported for transposed convolution, "
                             f"got padding_mode={padding_mode!r}")
        geom, layout = conv_transpose_geometry(input.shape, weight.shape, None, stride, padding,
                                               output_padding, groups, dilation, output_size,
                                               data_format, op)
        expected = geom.x_shape
    else:
        geom, layout = conv_geometry(input.shape, weight.shape, None, stride, padding, dilation,
                                     groups, padding_mode, data_format, op)
        expected = geom.y_shape
    g = _to_canonical(xp, grad_output, layout)
    if tuple(g.shape) != expected:
        raise ValueError(f"grad_output must have shape {_from_canonical_shape(expected, layout)}, "
                         f"got grad_output of shape {tuple(grad_output.shape)}")
    a = _to_canonical(xp, input, layout)
    grad_input = grad_weight = grad_bias = None
    if transposed:
        # out = conv^T(a): d/da = conv(g), d/dw = weight-grad with x=g, y=a.
        if "input" in needs:
            grad_input = _from_canonical(xp, engine.forward(g, weight, geom), layout)
        if "weight" in needs:
            grad_weight = engine.backward_weight(g, a, geom)
    else:
        inner = geom
        if geom.padding_mode != "zeros":
            a = _pad.pad(xp, a, geom.pad_lo, geom.pad_hi, geom.padding_mode)
            inner = geom.with_zero_padding()
        if "input" in needs:
            gx = engine.backward_input(g, weight, inner)
            if geom.padding_mode != "zeros":
                gx = _pad.pad_backward(xp, gx, geom.pad_lo, geom.pad_hi, geom.padding_mode)
            grad_input = _from_canonical(xp, gx, layout)
        if "weight" in needs:
            grad_weight = engine.backward_weight(a, g, inner)
    if "bias" in needs:
        grad_bias = _bias_grad(xp, g)
    return grad_input, grad_weight, grad_bias


def _from_canonical_shape(shape, layout):
    if layout.channels_last:
        shape = (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return tuple(shape[1:]) if layout.unbatched else tuple(shape)


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           padding_mode="zeros", data_format=None):
    """1-D convolution, as ``torch.nn.functional.conv1d`` (plus padding_mode and data_format)."""
    _check_rank(weight, 1, "conv1d")
    return conv_nd(input, weight, bias, stride, padding, dilation, groups,
                   padding_mode=padding_mode, data_format=data_format, op="conv1d")


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           padding_mode="zeros", data_format=None):
    """2-D convolution, as ``torch.nn.functional.conv2d`` (plus padding_mode and data_format)."""
    _check_rank(weight, 2, "conv2d")
    return conv_nd(input, weight, bias, stride, padding, dilation, groups,
                   padding_mode=padding_mode, data_format=data_format, op="conv2d")


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           padding_mode="zeros", data_format=None):
    """3-D convolution, as ``torch.nn.functional.conv3d`` (plus padding_mode and data_format)."""
    _check_rank(weight, 3, "conv3d")
    return conv_nd(input, weight, bias, stride, padding, dilation, groups,
                   padding_mode=padding_mode, data_format=data_format, op="conv3d")


def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1, *, output_size=None, data_format=None):
    """1-D transposed convolution, as ``torch.nn.functional.conv_transpose1d``."""
    _check_rank(weight, 1, "conv_transpose1d")
    return conv_transpose_nd(input, weight, bias, stride, padding, output_padding, groups, dilation,
                             output_size=output_size, data_format=data_format, op="conv_transpose1d")


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1, *, output_size=None, data_format=None):
    """2-D transposed convolution, as ``torch.nn.functional.conv_transpose2d``."""
    _check_rank(weight, 2, "conv_transpose2d")
    return conv_transpose_nd(input, weight, bias, stride, padding, output_padding, groups, dilation,
                             output_size=output_size, data_format=data_format, op="conv_transpose2d")


def conv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1, *, output_size=None, data_format=None):
    """3-D transposed convolution, as ``torch.nn.functional.conv_transpose3d``."""
    _check_rank(weight, 3, "conv_transpose3d")
    return conv_transpose_nd(input, weight, bias, stride, padding, output_padding, groups, dilation,
                             output_size=output_size, data_format=data_format, op="conv_transpose3d")


def _check_rank(weight, nd, op):
    shape = getattr(weight, "shape", None)
    if shape is not None and len(shape) != nd + 2:
        raise ValueError(f"{op} expects a {nd + 2}-D weight, got weight of size {list(shape)}")
