"""Terminal pictures for :mod:`ndconv.tools.explain` (plain text, ANSI colours on request)."""
from __future__ import annotations

import numpy as np

from ._common import fmt_num

# Foreground colours that read on dark and light terminals; element i gets PALETTE[i % 12].
PALETTE = ("31", "32", "34", "35", "36", "33", "91", "92", "94", "95", "96", "93")
DIM, BOLD, RESET = "2", "1", "\033[0m"
TEXT_PANELS = 16


def _paint(text, style, color):
    return f"\033[{style}m{text}{RESET}" if color and style else text


def _slices(a):
    """(label, 2-D array) pairs: 1-D is one row, 3-D one 2-D picture per depth index."""
    if a.ndim == 1:
        return [("", a[None, :])]
    if a.ndim == 2:
        return [("", a)]
    return [(f"depth {d}", a[d]) for d in range(a.shape[0])]


def _idx(name, idx):
    return f"{name}[{','.join(map(str, idx))}]"


def _grid(rows, color, row_labels=True, indent="    "):
    """``rows``: 2-D list of (text, style). Columns get index headers, rows index labels."""
    width = max(3, max(len(t) for r in rows for t, _ in r)) + 1
    lab = len(str(len(rows) - 1)) + 2 if row_labels else 0
    out = [indent + " " * lab + "".join(f"{c:>{width}}" for c in range(len(rows[0])))]
    for i, r in enumerate(rows):
        cells = "".join(" " * (width - len(t)) + _paint(t, s, color) for t, s in r)
        out.append(indent + (f"{i:>{lab - 2}}  " if row_labels else "") + cells)
    return out


def _array_lines(a, color, style_of=None, text_of=None):
    """An n-d array as grids (3-D: one per depth); ``style_of``/``text_of`` take the full index."""
    lines = []
    for label, sl in _slices(a):
        depth = int(label.split()[1]) if label else None
        if label:
            lines.append(f"  {label}:")
        rows = []
        for i in range(sl.shape[0]):
            row = []
            for j in range(sl.shape[1]):
                idx = (j,) if a.ndim == 1 else (i, j) if a.ndim == 2 else (depth, i, j)
                t = text_of(idx) if text_of else fmt_num(a[idx])
                row.append((t, style_of(idx) if style_of else ""))
            rows.append(row)
        lines += _grid(rows, color, row_labels=a.ndim > 1)
    return lines


def _factor(v):
    """A number inside a product: negatives in parentheses (``3*(-1)``)."""
    t = fmt_num(v)
    return f"({t})" if t.startswith("-") else t


def _span(start, step, k):
    """``0..3`` for a copy starting at ``start`` with taps ``step`` apart."""
    stop = start + step * (k - 1)
    return f"{start}..{stop}" if stop != start else f"{start}"


def _axes_words(nd):
    return {1: ("positions",), 2: ("rows", "cols"), 3: ("depths", "rows", "cols")}[nd]


def render(e, color):
    g = e.geometry
    lines = [f"{e.op}: input {'x'.join(map(str, e.input.shape))}, kernel {'x'.join(map(str, e.kernel.shape))}, "
             f"{e.params_text()}", ""]
    words = _axes_words(e.nd)
    if e.transposed:
        lines += _render_transposed(e, g, color, words)
    else:
        lines += _render_conv(e, g, color, words)
    return "\n".join(lines)


def _render_transposed(e, g, color, words):
    x, w = e.input, e.kernel
    elems = list(np.ndindex(*x.shape))
    style = {idx: PALETTE[n % len(PALETTE)] for n, idx in enumerate(elems)}
    step = " and ".join(f"{s} {wd}" for s, wd in zip(g.stride, words)) if len(set(g.stride)) > 1 \
        else f"{g.stride[0]}"
    lines = ["Every input element scales the whole kernel; the copy is added to a canvas, each copy",
             f"starting {step} further on than the previous one (the stride). Then padding crops the",
             "canvas edges and output_padding keeps extra positions at the end.", ""]
    lines.append("input x (one colour per element):")
    lines += _array_lines(x, color, style_of=lambda i: style[i])
    lines.append("kernel w:")
    lines += _array_lines(w, color)
    lines.append("")
    shown = elems[:TEXT_PANELS]
    for idx in shown:
        v = x[idx]
        where = ", ".join(f"{wd} {_span(i * s, d, k)}" for wd, i, s, d, k in
                          zip(words, idx, g.stride, g.dilation, g.kernel))
        lines.append(_paint(f"{_idx('x', idx)} = {fmt_num(v)}: {fmt_num(v)}*w added at {where}", style[idx], color))
        contrib, foot = e.contributions[idx], e.footprints[idx]
        lines += _array_lines(contrib, color, style_of=lambda i, s=style[idx], f=foot: s if f[i] else "",
                              text_of=lambda i, c=contrib, f=foot: fmt_num(c[i]) if f[i] else ".")
    if len(elems) > len(shown):
        lines.append(f"... {len(elems) - len(shown)} more copies, same pattern")
    lines.append("")
    full = " x ".join(map(str, e.full_size))
    lines.append(f"full canvas = sum of the {len(elems)} copies ({full}: (in-1)*stride + dilation*(k-1) + 1):")
    marks = []
    if any(g.pad_lo) or any(g.pad_hi):
        marks.append("(v) cropped by padding")
    kinds = {(d, p): e.position_kind(d, p) for d in range(e.nd) for p in range(e.canvas.shape[d])}
    if any(k == "op" for k in kinds.values()):
        marks.append("[v] would be cropped, kept by output_padding")
    if any(k == "zero" for k in kinds.values()):
        marks.append("<0> past the canvas: zeros added by output_padding")

    def cell_kind(i):
        ks = [kinds[(d, p)] for d, p in enumerate(i)]
        for k in ("crop", "zero", "op"):
            if k in ks:
                return k
        return "keep"

    def owner(i):
        who = [el for el in elems if e.footprints[el + tuple(i)]]
        return style[who[0]] if len(who) == 1 else BOLD

    def text_of(i):
        v = fmt_num(e.canvas[i])
        return {"crop": f"({v})", "op": f"[{v}]", "zero": "<0>", "keep": v}[cell_kind(i)]

    def style_of(i):
        return DIM if cell_kind(i) == "crop" else owner(i)
    if marks:
        lines.append("  " + ";  ".join(marks))
    lines += _array_lines(e.canvas, color, style_of=style_of, text_of=text_of)
    region = ", ".join(f"{wd} {a}..{b - 1}" for wd, (a, b) in zip(words, e.crop))
    lines.append(f"output = canvas {region}  ({'x'.join(map(str, e.output.shape))}, equals ndconv.{e.op}):")
    lines += _array_lines(e.output, color)
    return lines


def _render_conv(e, g, color, words):
    x, w = e.input, e.kernel
    lines = ["Each output cell is the sum of the kernel times one window of the padded input; the",
             "window moves by the stride, its taps are the dilation apart.", ""]
    lines.append("input x:")
    lines += _array_lines(x, color)
    lines.append("kernel w:")
    lines += _array_lines(w, color)
    pads = any(g.pad_lo) or any(g.pad_hi)
    if pads:
        inside = lambda i: all(a <= p < a + n for p, a, n in zip(i, g.pad_lo, x.shape))  # noqa: E731
        lines.append("padded input ((0) is padding):")
        lines += _array_lines(e.padded, color, style_of=lambda i: "" if inside(i) else DIM,
                              text_of=lambda i: fmt_num(e.padded[i]) if inside(i) else "(0)")
    lines.append("")
    taps = list(np.ndindex(*w.shape))
    base = "padded input" if pads else "input"
    for n, o in enumerate(np.ndindex(*e.output.shape)):
        pos = e.windows(o)
        terms = " + ".join(f"{_factor(e.padded[p])}*{_factor(w[t])}" for p, t in zip(pos, taps))
        where = ", ".join(f"{wd} {_span(oi * s, d, k)}" for wd, oi, s, d, k in
                          zip(words, o, g.stride, g.dilation, g.kernel))
        head = _paint(f"{_idx('y', o)}", PALETTE[n % len(PALETTE)], color)
        lines.append(f"  {head} = {terms} = {fmt_num(e.output[o])}   ({where} of the {base})")
    lines.append("")
    lines.append(f"output y ({'x'.join(map(str, e.output.shape))}, equals ndconv.{e.op}):")
    lines += _array_lines(e.output, color)
    return lines
