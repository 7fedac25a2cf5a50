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
from dataclasses import replace

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import cpu_depthwise as dw

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
        self.block_bytes = 4 << 20    # column block of the flat path (measured: 1-8 MiB all close)
        self.min_block = 256          # narrower GEMMs lose BLAS efficiency

    # ------------------------------------------------------------ the three primitives

    def forward(self, x, w, g):
        dt = compute_dtype(x.dtype)
        y = np.empty(g.y_shape, dtype=dt)
        if 0 in g.y_shape:
            return y.astype(x.dtype)
        if g.x_channels == 0:
            y[...] = 0
            return y.astype(x.dtype)
        if self._use_depthwise(g):
            return self._forward_depthwise(x, w, g, dt).astype(x.dtype, copy=False)
        if _unit_stride(g):
            return self._forward_flat(x, w, g, dt).astype(x.dtype, copy=False)
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
        if self._use_depthwise(g):
            return self._backward_input_depthwise(gy, w, g, dt, gx).astype(gy.dtype, copy=False)
        if _unit_stride(g) and all(lo <= d * (k - 1) for lo, d, k in zip(g.pad_lo, g.dilation, g.kernel)):
            # Stride 1: the input gradient is a forward convolution of gy with the
            # flipped, group-transposed kernel and the complementary padding.
            flipped = _flip_weight(w, g, dt)
            g2 = replace(g, x_channels=g.y_channels, y_channels=g.x_channels, x_size=g.y_size,
                         y_size=g.x_size, pad_lo=tuple(d * (k - 1) - lo for lo, d, k in
                                                       zip(g.pad_lo, g.dilation, g.kernel)),
                         pad_hi=(0,) * g.nd)
            return self._forward_flat(gy, flipped, g2, dt).astype(gy.dtype, copy=False)
        wt = np.swapaxes(_weight_matrix(w, g, dt), 1, 2)     # (G, Cx/G*K, Cy/G)
        for n0, n1, a, b in self._chunks(g, dt.itemsize):
            gyc = _rows(gy, g, n0, n1, a, b, dt)             # (nb, G, Cy/G, P)
            gcols = np.matmul(wt, gyc)                       # (nb, G, Cx/G*K, P)
            self._col2im_add(gcols, gx, g, n0, n1, a, b)
        return gx.astype(gy.dtype, copy=False)

    def backward_weight(self, x, gy, g):
        dt = compute_dtype(x.dtype)
        gw = np.zeros((g.groups, g.y_channels // g.groups, (g.x_channels // g.groups) * g.taps), dtype=dt)
        if 0 not in g.y_shape and g.x_channels and self._use_depthwise(g):
            gw = self._backward_weight_depthwise(x, gy, g, dt)
        elif 0 not in g.y_shape and g.x_channels and _unit_stride(g):
            gw = self._backward_weight_flat(x, gy, g, dt)
        elif 0 not in g.y_shape and g.x_channels:
            for n0, n1, a, b in self._chunks(g, dt.itemsize):
                cols = self._im2col(x, g, n0, n1, a, b, dt)  # (nb, G, Cx/G*K, P)
                gyc = _rows(gy, g, n0, n1, a, b, dt)         # (nb, G, Cy/G, P)
                gw += np.matmul(gyc, np.swapaxes(cols, 2, 3)).sum(axis=0)
        return gw.reshape(g.w_shape).astype(x.dtype, copy=False)

    # ------------------------------------------------------------ stride 1: flat columns

    def _flat_blocks(self, g, dt):
        """Padded per-sample buffers and the flat extent L of the output positions.

        With stride 1 every tap reads the flattened padded sample at a fixed offset, so
        a column block is one strided copy with a contiguous inner axis (no per-window
        gather); outputs are computed at padded-row pitch and the wrap-around columns
        are dropped when they are copied out.
        """
        need = need_extent(g)
        pitch = [math.prod(need[i + 1:]) for i in range(g.nd)]      # element strides of a padded sample
        length = sum((o - 1) * p for o, p in zip(g.y_size, pitch)) + 1
        per_col = dt.itemsize * (g.x_channels * g.taps + 2 * g.y_channels)
        block = max(self.min_block, min(length, self.block_bytes // per_col))
        return need, pitch, length, block

    def _flat_cols(self, flat, g, pitch, q0, width, buf):
        """Columns q0:q0+width of one padded sample (Cx, prod(need)) into buf (G, Cx/G*K, width)."""
        cg = g.x_channels // g.groups
        item = flat.itemsize
        view = as_strided(flat[:, q0:], shape=(g.groups, cg) + g.kernel + (width,),
                          strides=(cg * flat.strides[0], flat.strides[0])
                          + tuple(d * p * item for d, p in zip(g.dilation, pitch)) + (item,),
                          writeable=False)
        out = buf[..., :width]
        np.copyto(out.reshape(view.shape), view)
        return out

    def _forward_flat(self, x, w, g, dt):
        need, pitch, length, block = self._flat_blocks(g, dt)
        cg, yg = g.x_channels // g.groups, g.y_channels // g.groups
        wm = _weight_matrix(w, g, dt)                                  # (G, Cy/G, Cx/G*K)
        y = np.empty(g.y_shape, dtype=dt)
        full = np.empty((g.groups, yg, length), dtype=dt)              # y at padded pitch
        buf = np.empty((g.groups, cg * g.taps, block), dtype=dt)
        item = full.itemsize
        for n in range(g.batch):
            flat = self._padded(x, g, n, n + 1, 0, g.y_size[0], dt).reshape(g.x_channels, -1)
            self._note(flat, full, buf)
            for q0 in range(0, length, block):
                width = min(block, length - q0)
                cols = self._flat_cols(flat, g, pitch, q0, width, buf)
                np.matmul(wm, cols, out=full[:, :, q0:q0 + width])
            y[n] = as_strided(full, shape=(g.y_channels,) + g.y_size,
                              strides=(length * item,) + tuple(p * item for p in pitch), writeable=False)
        return y

    def _backward_weight_flat(self, x, gy, g, dt):
        need, pitch, length, block = self._flat_blocks(g, dt)
        cg, yg = g.x_channels // g.groups, g.y_channels // g.groups
        gw = np.zeros((g.groups, yg, cg * g.taps), dtype=dt)
        full = np.zeros((g.groups, yg, length), dtype=dt)               # gy at padded pitch, zero between rows
        buf = np.empty((g.groups, cg * g.taps, block), dtype=dt)
        item = full.itemsize
        rows = as_strided(full, shape=(g.y_channels,) + g.y_size,
                          strides=(length * item,) + tuple(p * item for p in pitch))
        for n in range(g.batch):
            flat = self._padded(x, g, n, n + 1, 0, g.y_size[0], dt).reshape(g.x_channels, -1)
            self._note(flat, full, buf)
            rows[...] = gy[n]
            for q0 in range(0, length, block):
                width = min(block, length - q0)
                cols = self._flat_cols(flat, g, pitch, q0, width, buf)
                gw += np.matmul(full[:, :, q0:q0 + width], np.swapaxes(cols, 1, 2))
        return gw.reshape(g.w_shape)

    # ------------------------------------------------------------ depthwise: compiled loops

    def _use_depthwise(self, g):
        return dw.AVAILABLE and g.x_channels == g.groups and g.groups > 1

    def _depthwise_args(self, g):
        return (dw.pad3(g.stride, g.nd, 1) + dw.pad3(g.dilation, g.nd, 1)
                + (g.y_channels // g.groups,))

    def _kernel5(self, w, g, dt):
        return np.ascontiguousarray(w, dtype=dt).reshape((g.y_channels,) + dw.pad3(g.kernel, g.nd, 1))

    def _forward_depthwise(self, x, w, g, dt):
        xp = self._padded(x, g, 0, g.batch, 0, g.y_size[0], dt)
        y = np.empty(g.y_shape, dtype=dt)
        self._note(xp)
        dw._forward(dw.as5d(xp, g.nd), self._kernel5(w, g, dt), dw.as5d(y, g.nd), *self._depthwise_args(g))
        return y

    def _backward_input_depthwise(self, gy, w, g, dt, gx):
        buf = np.zeros((g.batch, g.x_channels) + need_extent(g), dtype=dt)
        self._note(buf)
        gyc = np.ascontiguousarray(gy, dtype=dt)
        dw._backward_input(dw.as5d(gyc, g.nd), self._kernel5(w, g, dt), dw.as5d(buf, g.nd),
                           *self._depthwise_args(g))
        _add_unpadded(buf, gx, g, 0, g.batch, 0)
        return gx

    def _backward_weight_depthwise(self, x, gy, g, dt):
        xp = self._padded(x, g, 0, g.batch, 0, g.y_size[0], dt)
        gw = np.zeros((g.y_channels,) + dw.pad3(g.kernel, g.nd, 1), dtype=dt)
        self._note(xp)
        gyc = np.ascontiguousarray(gy, dtype=dt)
        dw._backward_weight(dw.as5d(xp, g.nd), dw.as5d(gyc, g.nd), gw, *self._depthwise_args(g))
        return gw.reshape(g.w_shape)

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
        _add_unpadded(buf, gx, g, n0, n1, start0)


def _add_unpadded(buf, gx, g, n0, n1, start0):
    """Add the part of a padded-coordinate buffer (nb, Cx, rows, *need[1:]) that lies inside x.

    ``start0`` is the padded coordinate of the buffer's first row; padding and any
    tail of x that no window reaches are left out (x there gets nothing).
    """
    dst, src = [slice(n0, n1), slice(None)], [slice(None), slice(None)]
    for i, (size, lo, extent) in enumerate(zip(g.x_size, g.pad_lo, buf.shape[2:])):
        t = start0 if i == 0 else 0
        r0 = max(0, lo - t)
        r1 = min(extent, size + lo - t)
        if r1 <= r0:
            return
        src.append(slice(r0, r1))
        dst.append(slice(r0 + t - lo, r1 + t - lo))
    gx[tuple(dst)] += buf[tuple(src)]


def _unit_stride(g):
    return all(s == 1 for s in g.stride)


def _flip_weight(w, g, dt):
    """(Cy, Cx/G, *k) -> (Cx, Cy/G, *k) per group, kernel reversed: the transposed kernel."""
    yg, cg = g.y_channels // g.groups, g.x_channels // g.groups
    v = np.asarray(w, dtype=dt).reshape((g.groups, yg, cg) + g.kernel)
    v = np.swapaxes(v, 1, 2)[(Ellipsis,) + (slice(None, None, -1),) * g.nd]
    return np.ascontiguousarray(v).reshape((g.x_channels, yg) + g.kernel)


def _weight_matrix(w, g, dt):
    """(Cy, Cx/G, *k) -> (G, Cy/G, Cx/G*K), a view when w is contiguous."""
    return np.asarray(w, dtype=dt).reshape(g.groups, g.y_channels // g.groups, -1)


def _rows(gy, g, n0, n1, a, b, dt):
    """gy[n0:n1, :, a:b] as (nb, G, Cy/G, P)."""
    part = np.asarray(gy[n0:n1, :, a:b], dtype=dt)
    return part.reshape(n1 - n0, g.groups, g.y_channels // g.groups, -1)
