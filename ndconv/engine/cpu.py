"""The NumPy engine: im2col + BLAS, split into chunks bounded by a workspace limit.

Layout of the temporaries (per chunk of ``nb`` samples and output rows ``a:b``):

    padded  (nb, Cx, rows, *need[1:])        zero-padded input, only what windows read
    cols    (nb, G, Cx/G * K, P)              one column per output position (P of them)
    weight  (G, Cy/G, Cx/G * K)               a view of w, no copy

so forward is ``weight @ cols`` straight into ``y`` viewed as (nb, G, Cy/G, P),
the weight gradient is ``gy @ cols^T`` and the input gradient is ``weight^T @ gy``
scattered back tap by tap (col2im).  No zeros are inserted for strides, so a
strided transposed convolution costs the same arithmetic as its forward twin.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

DEFAULT_WORKSPACE = 256 << 20


def compute_dtype(dtype):
    """float16 is computed (accumulated) in float32."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def need_extent(g):
    """Per dim, how much of the padded input the windows read: (o-1)s + d(k-1) + 1."""
    return tuple((o - 1) * s + d * (k - 1) + 1
                 for o, s, d, k in zip(g.y_size, g.stride, g.dilation, g.kernel))


class CPUEngine:
    name = "cpu"

    def __init__(self, workspace_limit=DEFAULT_WORKSPACE):
        self.workspace_limit = workspace_limit
        self.peak_temp_bytes = 0

    # ------------------------------------------------------------ the three primitives

    def forward(self, x, w, g):
        dt = compute_dtype(x.dtype)
        y = np.empty(g.y_shape, dtype=dt)
        if 0 in g.y_shape:
            return y.astype(x.dtype)
        if g.x_channels == 0:
            y[...] = 0
            return y.astype(x.dtype)
        wm = _weight_matrix(w, g, dt)                        # (G, Cy/G, Cx/G*K)
        for n0, n1, a, b in self._chunks(g, dt.itemsize):
            cols = self._im2col(x, g, n0, n1, a, b, dt)      # (nb, G, Cx/G*K, P)
            if (a, b) == (0, g.y_size[0]):
                out = y[n0:n1].reshape(n1 - n0, g.groups, -1, cols.shape[-1])
                np.matmul(wm, cols, out=out)
            else:
                res = np.matmul(wm, cols)                    # (nb, G, Cy/G, P)
                y[n0:n1, :, a:b] = res.reshape((n1 - n0, g.y_channels, b - a) + g.y_size[1:])
        return y.astype(x.dtype, copy=False)

    def backward_input(self, gy, w, g):
        dt = compute_dtype(gy.dtype)
        gx = np.zeros(g.x_shape, dtype=dt)
        if 0 in g.y_shape or 0 in g.x_shape:
            return gx.astype(gy.dtype)
        wt = np.swapaxes(_weight_matrix(w, g, dt), 1, 2)     # (G, Cx/G*K, Cy/G)
        for n0, n1, a, b in self._chunks(g, dt.itemsize):
            gyc = _rows(gy, g, n0, n1, a, b, dt)             # (nb, G, Cy/G, P)
            gcols = np.matmul(wt, gyc)                       # (nb, G, Cx/G*K, P)
            self._col2im_add(gcols, gx, g, n0, n1, a, b)
        return gx.astype(gy.dtype, copy=False)

    def backward_weight(self, x, gy, g):
        dt = compute_dtype(x.dtype)
        gw = np.zeros((g.groups, g.y_channels // g.groups, (g.x_channels // g.groups) * g.taps), dtype=dt)
        if 0 not in g.y_shape and g.x_channels:
            for n0, n1, a, b in self._chunks(g, dt.itemsize):
                cols = self._im2col(x, g, n0, n1, a, b, dt)  # (nb, G, Cx/G*K, P)
                gyc = _rows(gy, g, n0, n1, a, b, dt)         # (nb, G, Cy/G, P)
                gw += np.matmul(gyc, np.swapaxes(cols, 2, 3)).sum(axis=0)
        return gw.reshape(g.w_shape).astype(x.dtype, copy=False)

    # ------------------------------------------------------------ chunking

    def _chunks(self, g, itemsize=8):
        """Split (batch, first output dim) so that one chunk's temporaries fit the limit."""
        need = need_extent(g)
        out_rest = math.prod(g.y_size[1:])
        need_rest = math.prod(need[1:])
        per_row = itemsize * (g.x_channels * g.taps * out_rest + g.y_channels * out_rest)  # cols + rows of y
        pad_row = itemsize * g.x_channels * need_rest
        per_sample = per_row * g.y_size[0] + pad_row * need[0]
        limit = self.workspace_limit
        if per_sample <= limit:
            nb = max(1, min(g.batch, limit // max(per_sample, 1)))
            for n0 in range(0, g.batch, nb):
                yield n0, min(g.batch, n0 + nb), 0, g.y_size[0]
            return
        rows = max(1, limit // (per_row + pad_row * g.stride[0] + 1))
        for n0 in range(g.batch):
            for a in range(0, g.y_size[0], rows):
                yield n0, n0 + 1, a, min(g.y_size[0], a + rows)

    def _note(self, *arrays):
        self.peak_temp_bytes = max(self.peak_temp_bytes, sum(a.nbytes for a in arrays))

    # ------------------------------------------------------------ im2col / col2im

    def _padded(self, x, g, n0, n1, a, b, dt):
        """Zero-padded input rows read by output rows a:b: (nb, Cx, rows, *need[1:])."""
        need = need_extent(g)
        start0 = a * g.stride[0]
        rows = (b - a - 1) * g.stride[0] + g.dilation[0] * (g.kernel[0] - 1) + 1
        shape = (n1 - n0, g.x_channels, rows) + need[1:]
        buf = np.zeros(shape, dtype=dt)
        dst, src = [slice(None), slice(None)], [slice(n0, n1), slice(None)]
        for i, (size, lo, extent) in enumerate(zip(g.x_size, g.pad_lo, (rows,) + need[1:])):
            t = start0 if i == 0 else 0          # padded coordinate of the buffer's first element
            r0 = max(0, lo - t)
            r1 = min(extent, size + lo - t)
            if r1 <= r0:
                return buf
            dst.append(slice(r0, r1))
            src.append(slice(r0 + t - lo, r1 + t - lo))
        buf[tuple(dst)] = x[tuple(src)]
        return buf

    def _im2col(self, x, g, n0, n1, a, b, dt):
        padded = self._padded(x, g, n0, n1, a, b, dt)
        nb, cg = n1 - n0, g.x_channels // g.groups
        out = (b - a,) + g.y_size[1:]
        st = padded.strides
        view = as_strided(
            padded,
            shape=(nb, g.groups, cg) + g.kernel + out,
            strides=(st[0], cg * st[1], st[1])
            + tuple(d * s for d, s in zip(g.dilation, st[2:]))
            + tuple(s_ * s for s_, s in zip(g.stride, st[2:])),
            writeable=False)
        cols = np.empty(view.shape, dtype=dt)
        np.copyto(cols, view)
        self._note(padded, cols)
        return cols.reshape(nb, g.groups, cg * g.taps, -1)

    def _col2im_add(self, gcols, gx, g, n0, n1, a, b):
        """Scatter-add columns (nb, G, Cx/G*K, P) into gx[n0:n1] (rows for output a:b)."""
        nb, cg = n1 - n0, g.x_channels // g.groups
        need = need_extent(g)
        start0 = a * g.stride[0]
        rows = (b - a - 1) * g.stride[0] + g.dilation[0] * (g.kernel[0] - 1) + 1
        out = (b - a,) + g.y_size[1:]
        buf = np.zeros((nb, g.x_channels, rows) + need[1:], dtype=gx.dtype)
        self._note(buf, gcols)
        grouped = buf.reshape((nb, g.groups, cg, rows) + need[1:])
        taps = gcols.reshape((nb, g.groups, cg) + g.kernel + out)
        for tap in np.ndindex(*g.kernel):
            window = tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                           for t, d, s, o in zip(tap, g.dilation, g.stride, out))
            grouped[(Ellipsis,) + window] += taps[(slice(None),) * 3 + tap]
        dst, src = [slice(n0, n1), slice(None)], [slice(None), slice(None)]
        for i, (size, lo, extent) in enumerate(zip(g.x_size, g.pad_lo, (rows,) + need[1:])):
            t = start0 if i == 0 else 0
            r0 = max(0, lo - t)
            r1 = min(extent, size + lo - t)
            if r1 <= r0:
                return
            src.append(slice(r0, r1))
            dst.append(slice(r0 + t - lo, r1 + t - lo))
        gx[tuple(dst)] += buf[tuple(src)]


def _weight_matrix(w, g, dt):
    """(Cy, Cx/G, *k) -> (G, Cy/G, Cx/G*K), a view when w is contiguous."""
    return np.asarray(w, dtype=dt).reshape(g.groups, g.y_channels // g.groups, -1)


def _rows(gy, g, n0, n1, a, b, dt):
    """gy[n0:n1, :, a:b] as (nb, G, Cy/G, P)."""
    part = np.asarray(gy[n0:n1, :, a:b], dtype=dt)
    return part.reshape(n1 - n0, g.groups, g.y_channels // g.groups, -1)
