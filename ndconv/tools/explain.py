"""``ndconv explain`` / ``ndconv.explain(...)``: draw what a (transposed) convolution computes.

A transposed convolution is shown the way it is easiest to picture: every input element
scales the whole kernel and the copy is added to a canvas at ``index * stride`` (the stride
is the step between copies, the dilation the step between a copy's taps).  The sum of the
copies is the *full canvas*; ``padding`` then crops the canvas edges and ``output_padding``
keeps extra positions at the back edge.  A convolution is shown as the padded input with
each output cell's (dilated, strided) window and the sum of products it forms.

Every number drawn comes from ndconv itself: the copies are transposed convolutions of
one-hot inputs, the conv products are convolutions with one-hot kernels, and the final
output is checked against ``ndconv.conv_transpose2d`` / ``ndconv.conv2d`` & co.

    ndconv explain conv_transpose2d --input "2 4; 0 1" --kernel "3 1; 1 5" --stride 2 --padding 1
    ndconv explain conv2d --input "1 2 3; 4 5 6; 7 8 9" --kernel "1 0; 0 -1" --padding 1 --out conv.png

Matrix text: numbers separated by spaces or commas, rows by ``;``, 3-D slices by ``|``.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .. import functional as F
from ..geometry import conv_geometry, conv_transpose_geometry
from ._common import OPS, UserError, fmt_num, int_list, report_errors

MAX_ELEMENTS = 256      # pictures are for small examples; larger ones are unreadable anyway
MAX_SIDE = 40
MAX_PANELS = 16         # per-element (transposed) or per-window (conv) small pictures

# --------------------------------------------------------------------------- parsing


def parse_matrix(text, name="matrix"):
    """``"2 4; 0 1"`` -> 2-D array; ``"1 2 3"`` -> 1-D; slices separated by ``|`` -> 3-D."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{name}: expected numbers like \"2 4; 0 1\", got {text!r}")

    def row(part):
        vals = [v for v in part.replace(",", " ").split()]
        if not vals:
            raise UserError(f"{name}: empty row in {text!r} (rows are separated by ';')")
        out = []
        for v in vals:
            try:
                out.append(float(v))
            except ValueError:
                raise UserError(f"{name}: {v!r} is not a number in {text!r}") from None
        return out

    def rows(part):
        rs = [row(r) for r in part.split(";")]
        if len({len(r) for r in rs}) > 1:
            raise UserError(f"{name}: rows have different lengths ({', '.join(str(len(r)) for r in rs)}) "
                            f"in {text!r}")
        return rs

    if "|" in text:
        slices = [rows(s) for s in text.split("|")]
        if len({(len(s), len(s[0])) for s in slices}) > 1:
            raise UserError(f"{name}: slices have different shapes in {text!r}")
        return np.array(slices, dtype=np.float64)
    if ";" in text:
        return np.array(rows(text), dtype=np.float64)
    return np.array(row(text), dtype=np.float64)


def _as_array(value, name):
    if isinstance(value, str):
        return parse_matrix(value, name)
    try:
        a = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be numbers (a nested list, an array or matrix text), "
                        f"got {type(value).__name__}") from None
    return a


def _op_of(op, ndim):
    if op in ("conv", "conv_transpose"):
        op = f"{op}{ndim}d"
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)} (or 'conv'/'conv_transpose'), got op={op!r}")
    return op, int(op[-2]), op.startswith("conv_transpose")


# --------------------------------------------------------------------------- the arithmetic


class Explanation:
    """What :func:`explain` computed and draws.

    Always: ``op``, ``nd``, ``transposed``, ``input``, ``kernel``, ``geometry`` (the library's
    :class:`~ndconv.geometry.ConvGeometry`), ``output`` (equal to the ndconv op's result).

    Transposed: ``contributions`` (``input.shape + canvas.shape``: element ``i``'s scaled
    kernel copy on the canvas), ``footprints`` (where each copy lands, boolean, same shape),
    ``full`` (sum of the copies, uncropped, ``full_size``), ``canvas`` (``full`` extended with
    zeros where output_padding reaches past it), ``crop`` (per dim ``(start, stop)`` of the
    output inside the canvas).

    Convolution: ``padded`` (the zero-padded input), ``contributions``
    (``output.shape + kernel.shape``: the product ``x * w`` of every tap of every window),
    ``windows(o)`` (padded-input positions read by output cell ``o``).
    """

    def __init__(self, op, x, w, stride, padding, dilation, output_padding):
        op, nd, transposed = _op_of(op, x.ndim)
        for name, a in (("input", x), ("kernel", w)):
            if a.ndim != nd:
                raise ValueError(f"{op} needs a {nd}-D {name} (one channel, no batch), got {name} of "
                                 f"shape {a.shape}")
            if a.size == 0:
                raise ValueError(f"{name} must not be empty, got {name} of shape {a.shape}")
            if a.size > MAX_ELEMENTS or max(a.shape) > MAX_SIDE:
                raise ValueError(f"{name} of shape {a.shape} is too large to draw; explain is for small "
                                 f"examples (at most {MAX_ELEMENTS} elements, {MAX_SIDE} per side)")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{name} must hold finite numbers, got {a.tolist()}")
        self.op, self.nd, self.transposed = op, nd, transposed
        self.input, self.kernel = x, w
        x4, w4 = x[None, None], w[None, None]
        fn = getattr(F, op)
        if transposed:
            self.geometry, _ = conv_transpose_geometry(x4.shape, w4.shape, None, stride, padding,
                                                       output_padding, 1, dilation, op=op)
            self._transposed(fn, x4, w4, stride, padding, dilation, output_padding)
        else:
            if output_padding not in (0, None) and any(np.atleast_1d(output_padding)):
                raise ValueError(f"output_padding applies to transposed convolution only, got "
                                 f"output_padding={output_padding} for {op}")
            self.geometry, _ = conv_geometry(x4.shape, w4.shape, None, stride, padding, dilation, op=op)
            self._conv(fn, x4, w4, stride, padding, dilation)
        self._figure = None

    # -- transposed: one copy of the kernel per input element
    def _transposed(self, fn, x4, w4, stride, padding, dilation, output_padding):
        g = self.geometry
        x = self.input
        m = x.size
        onehot = np.zeros((m, 1) + x.shape)
        onehot.reshape(m, m)[np.arange(m), np.arange(m)] = x.ravel()
        unit = np.zeros_like(onehot)
        unit.reshape(m, m)[np.arange(m), np.arange(m)] = 1.0
        # Copies and footprints come from the engine: transposed conv of one-hot inputs, no crop.
        copies = fn(onehot, w4, None, g.stride, 0, 0, 1, g.dilation)[:, 0]
        feet = fn(unit, np.ones_like(w4), None, g.stride, 0, 0, 1, g.dilation)[:, 0] != 0
        full = fn(x4, w4, None, g.stride, 0, 0, 1, g.dilation)[0, 0]
        if not np.allclose(copies.sum(axis=0), full):
            raise RuntimeError("internal: the kernel copies do not sum to the full canvas")
        out = fn(x4, w4, None, stride, padding, output_padding, 1, dilation)[0, 0]
        self.full_size = full.shape
        lo = g.pad_lo
        size = tuple(max(f, a + o) for f, a, o in zip(full.shape, lo, out.shape))
        pad = [(0, s - f) for s, f in zip(size, full.shape)]
        self.canvas = np.pad(full, pad)
        self.contributions = np.pad(copies, [(0, 0)] + pad).reshape(x.shape + size)
        self.footprints = np.pad(feet, [(0, 0)] + pad).reshape(x.shape + size)
        self.full = full
        self.crop = tuple((a, a + o) for a, o in zip(lo, out.shape))
        region = tuple(slice(a, b) for a, b in self.crop)
        if out.shape != tuple(g.x_size) or not np.allclose(self.canvas[region], out):
            raise RuntimeError("internal: the cropped canvas differs from ndconv's output")
        self.output = out

    def position_kind(self, dim, p):
        """Transposed: 'crop' (padding removes it), 'keep', 'op' (cropped by padding but kept by
        output_padding) or 'zero' (past the full canvas, zeros added by output_padding)."""
        a, b = self.crop[dim]
        if p < a or p >= b:
            return "crop"
        if p >= self.full_size[dim]:
            return "zero"
        if p >= self.full_size[dim] - self.geometry.pad_hi[dim]:
            return "op"
        return "keep"

    # -- convolution: one window per output cell
    def _conv(self, fn, x4, w4, stride, padding, dilation):
        g = self.geometry
        w = self.kernel
        t = w.size
        taps = np.zeros((t, 1) + w.shape)
        taps.reshape(t, t)[np.arange(t), np.arange(t)] = w.ravel()
        # Each tap's product with every window, from the engine: conv with one-hot kernels.
        terms = fn(x4, taps, None, g.stride, padding, g.dilation)[0]
        out = fn(x4, w4, None, stride, padding, dilation)[0, 0]
        if not np.allclose(terms.sum(axis=0), out):
            raise RuntimeError("internal: the window products do not sum to ndconv's output")
        self.contributions = np.moveaxis(terms.reshape(w.shape + out.shape), list(range(self.nd)),
                                         list(range(out.ndim, out.ndim + self.nd)))
        self.padded = np.pad(self.input, list(zip(g.pad_lo, g.pad_hi)))
        self.output = out

    def windows(self, o):
        """Conv: the padded-input positions (one tuple per kernel tap, in kernel order) read by output ``o``."""
        g = self.geometry
        taps = np.ndindex(*self.kernel.shape)
        return [tuple(oi * s + ti * d for oi, ti, s, d in zip(o, t, g.stride, g.dilation)) for t in taps]

    # -- views
    def text(self, color=False):
        """The terminal picture (ANSI colours when ``color``)."""
        from ._explain_text import render
        return render(self, color)

    def __str__(self):
        return self.text(False)

    @property
    def figure(self):
        """The matplotlib figure (Agg canvas, made on first use)."""
        if self._figure is None:
            from ._explain_figure import build
            self._figure = build(self)
        return self._figure

    def save(self, path):
        """Write the figure; the format follows the suffix (``.png``, ``.svg``, ``.pdf``)."""
        ext = os.path.splitext(str(path))[1].lower()
        if ext not in (".png", ".svg", ".pdf"):
            raise ValueError(f"path must end in .png, .svg or .pdf, got path={str(path)!r}")
        self.figure.savefig(path, dpi=150 if ext == ".png" else None, facecolor="white")
        return path

    def params_text(self):
        g = self.geometry

        def one(v):
            return str(v[0]) if len(set(v)) == 1 else str(tuple(v))
        parts = [f"stride {one(g.stride)}"]
        if g.pad_lo == g.pad_hi:
            parts.append(f"padding {one(g.pad_lo)}")
        else:
            parts.append(f"padding lo {one(g.pad_lo)} hi {one(g.pad_hi)}")
        parts.append(f"dilation {one(g.dilation)}")
        if self.transposed:
            smallest = [f - a - b for f, a, b in zip(self.full_size, g.pad_lo, g.pad_hi)]
            parts.append(f"output_padding {one([o - s for o, s in zip(self.output.shape, smallest)])}")
        return ", ".join(parts)


def explain(op, input, kernel, stride=1, padding=0, dilation=1, output_padding=0):
    """Compute and (lazily) draw one single-channel (transposed) convolution.

    ``op``: ``'conv1d'`` ... ``'conv_transpose3d'`` (or ``'conv'``/``'conv_transpose'``, the
    dimension following ``input``).  ``input`` and ``kernel``: arrays, nested lists or matrix
    text such as ``"2 4; 0 1"``, without batch or channel dims.  Returns an
    :class:`Explanation` holding the arrays drawn; ``.figure`` is the matplotlib figure,
    ``.save(path)`` writes it, ``.text()`` is the terminal picture.
    """
    x = _as_array(input, "input")
    w = _as_array(kernel, "kernel")
    return Explanation(op, x, w, stride, padding, dilation, output_padding)


# --------------------------------------------------------------------------- command line


def add_arguments(parser):
    parser.add_argument("op", choices=OPS, help="the operation")
    parser.add_argument("--input", required=True, metavar="MATRIX",
                        help='input values, e.g. "2 4; 0 1" (rows by ";", 3-D slices by "|")')
    parser.add_argument("--kernel", required=True, metavar="MATRIX", help='kernel values, e.g. "3 1; 1 5"')
    parser.add_argument("--stride", default="1", help="one value or one per dim (default 1)")
    parser.add_argument("--padding", default="0", help="one value or one per dim (default 0)")
    parser.add_argument("--dilation", default="1", help="one value or one per dim (default 1)")
    parser.add_argument("--output-padding", default="0", help="transposed only (default 0)")
    parser.add_argument("--out", metavar="FILE", help="write a picture (.png or .svg) instead of drawing "
                                                      "in the terminal")


def _tuple_arg(text, name, minimum):
    values = int_list(text, name, minimum=minimum)
    return values[0] if len(values) == 1 else tuple(values)


def use_color(stream=None):
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


@report_errors
def run(args):
    x = parse_matrix(args.input, "--input")
    w = parse_matrix(args.kernel, "--kernel")
    if args.out is not None:
        ext = os.path.splitext(args.out)[1].lower()
        if ext not in (".png", ".svg", ".pdf"):
            raise UserError(f"--out must end in .png, .svg or .pdf, got {args.out!r}")
    e = explain(args.op, x, w, _tuple_arg(args.stride, "--stride", 1), _tuple_arg(args.padding, "--padding", 0),
                _tuple_arg(args.dilation, "--dilation", 1),
                _tuple_arg(args.output_padding, "--output-padding", 0))
    if args.out is None:
        print(e.text(use_color()))
        return 0
    try:
        e.save(args.out)
    except OSError as exc:
        raise UserError(f"cannot write {args.out!r}: {exc.strerror or exc}") from None
    print(f"wrote {args.out}")
    return 0
