"""A naive, direct-loop reference for N-d convolution and transposed convolution.

Written from the definitions only, in float64, sharing no code with ``ndconv``:

* convolution gathers: output position ``o`` reads the zero-padded input at
  ``o*stride + tap*dilation`` for every kernel tap;
* transposed convolution scatters: every input element adds a scaled copy of the
  (dilated) kernel into the output at ``i*stride``, and the result is cropped by
  ``pad_lo`` at the front and ``pad_hi`` at the back, ``output_padding`` extending
  the back edge again (positions no kernel copy reached hold zero).

The loops run over output (or input) positions explicitly; only batch and channel
axes are vectorised, with ``einsum``.  Arrays are canonical: channels-first,
batched, ``(N, C, *spatial)``; weights ``(C_out, C_in/G, *k)`` for convolution and
``(C_in, C_out/G, *k)`` for transposed convolution, as in PyTorch.

Padding modes (reflect/replicate/circular) are written as an explicit index map
per axis, so their gradient is a scatter-add through the same map.
"""
from __future__ import annotations

import itertools

import numpy as np


# ------------------------------------------------------------------ argument helpers

def _tup(v, nd):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def _pads(padding, nd):
    """int, per-dim ints or per-dim (lo, hi) pairs -> (lo tuple, hi tuple)."""
    if isinstance(padding, int):
        return (padding,) * nd, (padding,) * nd
    lo, hi = [], []
    for p in padding:
        if isinstance(p, (tuple, list)):
            lo.append(p[0])
            hi.append(p[1])
        else:
            lo.append(p)
            hi.append(p)
    return tuple(lo), tuple(hi)


def _flat(a):
    """(A, B, *k) -> (A, B, K): einsum cannot sum over an ellipsis."""
    return a.reshape(a.shape[:2] + (int(np.prod(a.shape[2:])),))


def _window(start, kernel, dilation):
    """Slices of the dilated window that starts at ``start``."""
    return tuple(slice(b, b + d * (k - 1) + 1, d) for b, k, d in zip(start, kernel, dilation))


# ------------------------------------------------------------------ padding modes

def pad_index(size, lo, hi, mode):
    """For each padded position along one axis, the source index, or -1 for a zero."""
    out = []
    for p in range(-lo, size + hi):
        if 0 <= p < size:
            out.append(p)
        elif mode == "zeros":
            out.append(-1)
        elif mode == "replicate":
            out.append(0 if p < 0 else size - 1)
        elif mode == "circular":
            out.append(p % size)
        elif mode == "reflect":
            q = -p if p < 0 else 2 * (size - 1) - p
            if not 0 <= q < size:
                raise ValueError("reflect padding wider than the input")
            out.append(q)
        else:
            raise ValueError(mode)
    return out


def pad(x, lo, hi, mode="zeros"):
    """Pad the spatial axes of (N, C, *s) by an explicit per-position copy."""
    nd = x.ndim - 2
    maps = [pad_index(x.shape[2 + i], lo[i], hi[i], mode) for i in range(nd)]
    out = np.zeros(x.shape[:2] + tuple(len(m) for m in maps), dtype=np.float64)
    for pos in itertools.product(*[range(len(m)) for m in maps]):
        src = tuple(m[p] for m, p in zip(maps, pos))
        if min(src) >= 0:
            out[(slice(None), slice(None)) + pos] = x[(slice(None), slice(None)) + src]
    return out


def pad_grad(gpad, size, lo, hi, mode="zeros"):
    """Gradient of :func:`pad`: each padded position adds into its source."""
    nd = gpad.ndim - 2
    maps = [pad_index(size[i], lo[i], hi[i], mode) for i in range(nd)]
    out = np.zeros(gpad.shape[:2] + tuple(size), dtype=np.float64)
    for pos in itertools.product(*[range(len(m)) for m in maps]):
        src = tuple(m[p] for m, p in zip(maps, pos))
        if min(src) >= 0:
            out[(slice(None), slice(None)) + src] += gpad[(slice(None), slice(None)) + pos]
    return out


# ------------------------------------------------------------------ convolution

def conv_output_size(x_size, kernel, stride, lo, hi, dilation):
    return tuple((n + a + b - d * (k - 1) - 1) // s + 1
                 for n, k, s, a, b, d in zip(x_size, kernel, stride, lo, hi, dilation))


def conv(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """y[n, co, o] = b[co] + sum_{ci, t} w[co, ci, t] * xpad[n, g*Cg + ci, o*s + t*d]."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    nd = w.ndim - 2
    stride, dilation = _tup(stride, nd), _tup(dilation, nd)
    lo, hi = _pads(padding, nd)
    kernel = w.shape[2:]
    n, c_in = x.shape[:2]
    c_out, cg = w.shape[:2]
    og = c_out // groups
    xp = pad(x, lo, hi, padding_mode)
    y_size = conv_output_size(x.shape[2:], kernel, stride, lo, hi, dilation)
    y = np.zeros((n, c_out) + y_size)
    for o in itertools.product(*[range(m) for m in y_size]):
        start = tuple(i * s for i, s in zip(o, stride))
        patch = xp[(slice(None), slice(None)) + _window(start, kernel, dilation)]  # (N, C, *k)
        for g in range(groups):
            y[(slice(None), slice(g * og, (g + 1) * og)) + o] = np.einsum(
                "nct,oct->no", _flat(patch[:, g * cg:(g + 1) * cg]), _flat(w[g * og:(g + 1) * og]))
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64).reshape((1, -1) + (1,) * nd)
    return y


def conv_grad_input(gy, w, x_size, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """Scatter every output gradient back through the taps that produced it."""
    gy = np.asarray(gy, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    nd = w.ndim - 2
    stride, dilation = _tup(stride, nd), _tup(dilation, nd)
    lo, hi = _pads(padding, nd)
    kernel = w.shape[2:]
    c_out, cg = w.shape[:2]
    og = c_out // groups
    n = gy.shape[0]
    padded = tuple(s + a + b for s, a, b in zip(x_size, lo, hi))
    gxp = np.zeros((n, cg * groups) + padded)
    for o in itertools.product(*[range(m) for m in gy.shape[2:]]):
        start = tuple(i * s for i, s in zip(o, stride))
        win = _window(start, kernel, dilation)
        for g in range(groups):
            contrib = np.einsum("no,oc...->nc...", gy[(slice(None), slice(g * og, (g + 1) * og)) + o],
                                w[g * og:(g + 1) * og])
            gxp[(slice(None), slice(g * cg, (g + 1) * cg)) + win] += contrib
    return pad_grad(gxp, x_size, lo, hi, padding_mode)


def conv_grad_weight(x, gy, w_shape, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """gw[co, ci, t] = sum_{n, o} gy[n, co, o] * xpad[n, g*Cg + ci, o*s + t*d]."""
    x = np.asarray(x, dtype=np.float64)
    gy = np.asarray(gy, dtype=np.float64)
    nd = len(w_shape) - 2
    stride, dilation = _tup(stride, nd), _tup(dilation, nd)
    lo, hi = _pads(padding, nd)
    kernel = tuple(w_shape[2:])
    c_out, cg = w_shape[:2]
    og = c_out // groups
    xp = pad(x, lo, hi, padding_mode)
    gw = np.zeros(tuple(w_shape))
    for o in itertools.product(*[range(m) for m in gy.shape[2:]]):
        start = tuple(i * s for i, s in zip(o, stride))
        patch = xp[(slice(None), slice(None)) + _window(start, kernel, dilation)]
        for g in range(groups):
            gw[g * og:(g + 1) * og] += np.einsum(
                "no,nc...->oc...", gy[(slice(None), slice(g * og, (g + 1) * og)) + o],
                patch[:, g * cg:(g + 1) * cg])
    return gw


def bias_grad(gy):
    gy = np.asarray(gy, dtype=np.float64)
    return gy.sum(axis=(0,) + tuple(range(2, gy.ndim)))


# ------------------------------------------------------------------ transposed convolution

def conv_transpose_output_size(y_size, kernel, stride, lo, hi, dilation, output_padding):
    return tuple((n - 1) * s - a - b + d * (k - 1) + 1 + op
                 for n, k, s, a, b, d, op in zip(y_size, kernel, stride, lo, hi, dilation, output_padding))


def conv_transpose(y, w, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Scatter: input element y[n, ci, i] adds y * w[ci, :, t] at output i*s + t*d - pad_lo."""
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    nd = w.ndim - 2
    stride, dilation = _tup(stride, nd), _tup(dilation, nd)
    output_padding = _tup(output_padding, nd)
    lo, hi = _pads(padding, nd)
    kernel = w.shape[2:]
    c_in, og = w.shape[:2]
    cg = c_in // groups
    n = y.shape[0]
    out_size = conv_transpose_output_size(y.shape[2:], kernel, stride, lo, hi, dilation, output_padding)
    full = tuple((m - 1) * s + d * (k - 1) + 1 for m, s, d, k in zip(y.shape[2:], stride, dilation, kernel))
    # The uncropped scatter target, long enough for output_padding beyond the last copy.
    buf = np.zeros((n, og * groups) + tuple(max(f, a + o) for f, a, o in zip(full, lo, out_size)))
    for i in itertools.product(*[range(m) for m in y.shape[2:]]):
        start = tuple(p * s for p, s in zip(i, stride))
        win = _window(start, kernel, dilation)
        for g in range(groups):
            contrib = np.einsum("nc,co...->no...", y[(slice(None), slice(g * cg, (g + 1) * cg)) + i],
                                w[g * cg:(g + 1) * cg])
            buf[(slice(None), slice(g * og, (g + 1) * og)) + win] += contrib
    out = buf[(slice(None), slice(None)) + tuple(slice(a, a + o) for a, o in zip(lo, out_size))]
    out = np.ascontiguousarray(out)
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64).reshape((1, -1) + (1,) * nd)
    return out


def _uncropped(gout, y_size, kernel, stride, lo, dilation):
    """The output gradient placed back into the scatter's uncropped coordinates."""
    full = tuple((m - 1) * s + d * (k - 1) + 1 for m, s, d, k in zip(y_size, stride, dilation, kernel))
    size = tuple(max(f, a + o) for f, a, o in zip(full, lo, gout.shape[2:]))
    buf = np.zeros(gout.shape[:2] + size)
    buf[(slice(None), slice(None)) + tuple(slice(a, a + o) for a, o in zip(lo, gout.shape[2:]))] = gout
    return buf


def conv_transpose_grad_input(gout, w, y_size, stride=1, padding=0, groups=1, dilation=1):
    """gy[n, ci, i] = sum_{co, t} w[ci, co, t] * gout_full[n, g*Og + co, i*s + t*d]."""
    gout = np.asarray(gout, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    nd = w.ndim - 2
    stride, dilation = _tup(stride, nd), _tup(dilation, nd)
    lo, _ = _pads(padding, nd)
    kernel = w.shape[2:]
    c_in, og = w.shape[:2]
    cg = c_in // groups
    buf = _uncropped(gout, y_size, kernel, stride, lo, dilation)
    gy = np.zeros((gout.shape[0], c_in) + tuple(y_size))
    for i in itertools.product(*[range(m) for m in y_size]):
        start = tuple(p * s for p, s in zip(i, stride))
        patch = buf[(slice(None), slice(None)) + _window(start, kernel, dilation)]
        for g in range(groups):
            gy[(slice(None), slice(g * cg, (g + 1) * cg)) + i] = np.einsum(
                "not,cot->nc", _flat(patch[:, g * og:(g + 1) * og]), _flat(w[g * cg:(g + 1) * cg]))
    return gy


def conv_transpose_grad_weight(y, gout, w_shape, stride=1, padding=0, groups=1, dilation=1):
    """gw[ci, co, t] = sum_{n, i} y[n, ci, i] * gout_full[n, g*Og + co, i*s + t*d]."""
    y = np.asarray(y, dtype=np.float64)
    gout = np.asarray(gout, dtype=np.float64)
    nd = len(w_shape) - 2
    stride, dilation = _tup(stride, nd), _tup(dilation, nd)
    lo, _ = _pads(padding, nd)
    kernel = tuple(w_shape[2:])
    c_in, og = w_shape[:2]
    cg = c_in // groups
    buf = _uncropped(gout, y.shape[2:], kernel, stride, lo, dilation)
    gw = np.zeros(tuple(w_shape))
    for i in itertools.product(*[range(m) for m in y.shape[2:]]):
        start = tuple(p * s for p, s in zip(i, stride))
        patch = buf[(slice(None), slice(None)) + _window(start, kernel, dilation)]
        for g in range(groups):
            gw[g * cg:(g + 1) * cg] += np.einsum(
                "nc,no...->co...", y[(slice(None), slice(g * cg, (g + 1) * cg)) + i],
                patch[:, g * og:(g + 1) * og])
    return gw


# ------------------------------------------------------------------ random valid cases (NumPy RNG)

def random_conv_case(rng, nd, modes=("zeros", "reflect", "replicate", "circular"), max_batch=2):
    """A valid convolution: dict of canonical shapes and arguments."""
    while True:
        groups = int(rng.integers(1, 4))
        cg, og = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        kernel = tuple(int(v) for v in rng.integers(1, 4, nd))
        stride = tuple(int(v) for v in rng.integers(1, 4, nd))
        dilation = tuple(int(v) for v in rng.integers(1, 3, nd))
        lo = tuple(int(v) for v in rng.integers(0, 3, nd))
        hi = tuple(int(v) for v in rng.integers(0, 3, nd))
        mode = modes[int(rng.integers(len(modes)))]
        x_size = tuple(int(v) for v in rng.integers(1, 7 if nd < 3 else 5, nd))
        span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
        if any(n + a + b < e for n, a, b, e in zip(x_size, lo, hi, span)):
            continue
        if mode == "reflect" and any(max(a, b) >= n for n, a, b in zip(x_size, lo, hi)):
            continue
        if mode == "circular" and any(max(a, b) > n for n, a, b in zip(x_size, lo, hi)):
            continue
        return dict(batch=int(rng.integers(0, max_batch + 1)), c_in=cg * groups, c_out=og * groups,
                    groups=groups, kernel=kernel, stride=stride, dilation=dilation, lo=lo, hi=hi,
                    mode=mode, x_size=x_size)


def random_transpose_case(rng, nd, max_batch=2):
    """A valid transposed convolution (input is y of size y_size)."""
    while True:
        groups = int(rng.integers(1, 4))
        cg, og = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        kernel = tuple(int(v) for v in rng.integers(1, 4, nd))
        stride = tuple(int(v) for v in rng.integers(1, 4, nd))
        dilation = tuple(int(v) for v in rng.integers(1, 3, nd))
        lo = tuple(int(v) for v in rng.integers(0, 3, nd))
        hi = tuple(int(v) for v in rng.integers(0, 3, nd))
        out_pad = tuple(int(rng.integers(0, max(s, d))) for s, d in zip(stride, dilation))
        y_size = tuple(int(v) for v in rng.integers(1, 5 if nd < 3 else 4, nd))
        out = [(n - 1) * s - a - b + d * (k - 1) + 1 + p
               for n, s, a, b, d, k, p in zip(y_size, stride, lo, hi, dilation, kernel, out_pad)]
        if min(out) <= 0:
            continue
        return dict(batch=int(rng.integers(0, max_batch + 1)), c_in=cg * groups, c_out=og * groups,
                    groups=groups, kernel=kernel, stride=stride, dilation=dilation, lo=lo, hi=hi,
                    output_padding=out_pad, y_size=y_size, out_size=tuple(out))


def pairs(lo, hi):
    return [(int(a), int(b)) for a, b in zip(lo, hi)]
