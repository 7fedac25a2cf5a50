"""Conversion between ndconv modules and PyTorch modules (torch is imported lazily).

``from_torch(m)``: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``,
``nn.ReLU``/``Sigmoid``/``Tanh`` and ``nn.Sequential`` of them (nested Sequentials become nested Sequentials) to
ndconv layers; ``to_torch(m)`` the other way.  Weights are copied (never shared),
dtypes kept (float16/32/64), bias ``(C,)`` <-> ``(1, C, 1, ...)``.

Parameter mapping: padding <-> pad (PyTorch's ``'same'``/``'valid'`` become
explicit ``(lo, hi)`` pairs, extra unit at the back, as PyTorch pads),
output_padding <-> postpad, dilation, groups, bias <-> useBias, padding_mode
<-> padding_mode (convolution only, as in PyTorch).  ndconv pads that PyTorch
cannot express (asymmetric pairs that are not a 'same' pattern, or any
asymmetric pad of a transposed layer) raise ValueError.  Other layer types
raise TypeError naming the class.
"""
from __future__ import annotations

import numpy as np

from .backend import gpuarray
from .containers import Sequential
from .modules.conv import (Conv1D, Conv2D, Conv3D, ConvND, Deconv1D, Deconv2D, Deconv3D,
                           DeconvND)
from .variable import Variable

__all__ = ["from_torch", "to_torch"]


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("ndconv.interop needs PyTorch: pip install torch") from e
    return torch


def _np_dtype(tdtype):
    torch = _torch()
    table = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
    if tdtype not in table:
        raise TypeError(f"only float16/float32/float64 parameters convert, got dtype {tdtype}")
    return np.dtype(table[tdtype])


def _to_device_array(t, on_gpu):
    a = t.detach().cpu().numpy().copy()
    return gpuarray.to_gpu(a) if on_gpu else a


def _conv_from_torch(m, name):
    torch = _torch()
    nn = torch.nn
    nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2,
          nn.ConvTranspose3d: 3}[type(m)]
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    kernel = tuple(m.kernel_size)
    padding = m.padding
    if isinstance(padding, str):
        if padding == "valid":
            pad = 0
        else:   # 'same': PyTorch puts the odd unit at the back
            total = [d * (k - 1) for k, d in zip(kernel, m.dilation)]
            pad = tuple((t // 2, t - t // 2) for t in total)
    else:
        pad = tuple(padding)
    dtype = _np_dtype(m.weight.dtype)
    common = dict(stride=tuple(m.stride), pad=pad, dilation=tuple(m.dilation), useBias=m.bias is not None,
                  name=name, empty=True, groups=m.groups)
    if transposed:
        if m.padding_mode != "zeros":
            raise ValueError(f"Only 'zeros' padding mode is supported for transposed convolution, "
                             f"got padding_mode={m.padding_mode!r}")
        mod = (Deconv1D, Deconv2D, Deconv3D)[nd - 1](m.in_channels, m.out_channels, kernel, postpad=tuple(m.output_padding), **common)
    else:
        mod = (Conv1D, Conv2D, Conv3D)[nd - 1](m.in_channels, m.out_channels, kernel, padding_mode=m.padding_mode, **common)
    mod.calcMode(dtype)
    on_gpu = gpuarray.gpu_available()
    mod.setVar("W", Variable(_to_device_array(m.weight, on_gpu)))
    if m.bias is not None:
        b = _to_device_array(m.bias, on_gpu).reshape((1, -1) + (1,) * nd)
        mod.setVar("b", Variable(b))
    return mod


def from_torch(m, name=None):
    """An ndconv module equal to the PyTorch module ``m`` (weights copied)."""
    torch = _torch()
    nn = torch.nn
    conv_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    if type(m) in conv_types:
        return _conv_from_torch(m, name)
    acts = _activation_pairs()
    if type(m) in acts:
        return acts[type(m)](name=name)
    if isinstance(m, nn.Sequential):
        seq = Sequential(name)
        for child_name, child in m.named_children():
            seq.append(from_torch(child, name=child_name))
        return seq
    raise TypeError(f"from_torch converts Conv1d/2d/3d, ConvTranspose1d/2d/3d, ReLU/Sigmoid/Tanh and "
                    f"nn.Sequential of them, "
                    f"got {type(m).__module__}.{type(m).__name__}")


def _activation_pairs():
    """``{torch class: ndconv class}`` of the parameter-free activations."""
    nn = _torch().nn
    from .activations import ReLU, Sigmoid, Tanh
    return {nn.ReLU: ReLU, nn.Sigmoid: Sigmoid, nn.Tanh: Tanh}


def _torch_padding(mod):
    lo = tuple(p[0] for p in mod.pad)
    hi = tuple(p[1] for p in mod.pad)
    if lo == hi:
        return lo
    total = [d * (k - 1) for k, d in zip(mod.size, mod.dilation)]
    same = tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
    if not mod.transposed and (lo, hi) == same and all(s == 1 for s in mod.stride):
        return "same"
    raise ValueError(f"PyTorch cannot express the asymmetric pad of {mod!r} (pad={mod.pad}); "
                     f"pad the data explicitly and use a symmetric pad")


def to_torch(mod):
    """A PyTorch module equal to the ndconv module ``mod`` (weights copied, on the CPU)."""
    torch = _torch()
    nn = torch.nn
    if isinstance(mod, (ConvND, DeconvND)):
        if "W" not in mod.vars or (mod.useBias and "b" not in mod.vars):
            raise ValueError(f"cannot convert {mod!r}: its parameters are not set (empty=True)")
        padding = _torch_padding(mod)
        W = gpuarray.to_host(mod.vars["W"].data)
        tdtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                  np.dtype(np.float64): torch.float64}[np.dtype(W.dtype)]
        if mod.transposed:
            cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[mod.nd - 1]
            t = cls(mod.inmaps, mod.outmaps, mod.size, stride=mod.stride, padding=padding,
                    output_padding=mod.postpad, groups=mod.groups, bias=mod.useBias, dilation=mod.dilation,
                    dtype=tdtype)
        else:
            cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[mod.nd - 1]
            t = cls(mod.inmaps, mod.outmaps, mod.size, stride=mod.stride, padding=padding,
                    dilation=mod.dilation, groups=mod.groups, bias=mod.useBias, padding_mode=mod.padding_mode,
                    dtype=tdtype)
        with torch.no_grad():
            t.weight.copy_(torch.from_numpy(np.array(W)))
            if mod.useBias:
                t.bias.copy_(torch.from_numpy(np.array(gpuarray.to_host(mod.vars["b"].data)).reshape(-1)))
        return t
    for tcls, ncls in _activation_pairs().items():
        if type(mod) is ncls:
            return tcls()
    if isinstance(mod, Sequential):
        from collections import OrderedDict
        return nn.Sequential(OrderedDict((name, to_torch(child)) for name, child in mod.children()))
    raise TypeError(f"to_torch converts ConvND/DeconvND layers, ReLU/Sigmoid/Tanh and Sequential of them, "
                    f"got {type(mod).__name__}")
