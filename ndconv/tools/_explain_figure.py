"""Matplotlib pictures for :mod:`ndconv.tools.explain` (Agg canvas, matplotlib imported here only).

The layout is done in inches: every panel is a grid of fixed-size cells with room reserved
above (title, column indices) and below (caption), so text never overlaps however many
panels a picture has.
"""
from __future__ import annotations

import textwrap

import numpy as np

from ._common import fmt_num

CELL = 0.46           # inches per matrix cell
TOP = 0.62            # title + column indices
BOTTOM_LINE = 0.19    # one caption line
LEFT = 0.46           # row indices + row label
RIGHT = 0.12
GAP = 0.42            # between panels (holds "+", "=")
MARGIN = 0.25
HEADER_LINE = 0.24
PER_ROW_2D = 4
LEGEND_W = 2.6

# tab10 without its grey: one colour per input element (transposed) or output cell (conv).
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
          "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d")
GOLD = "#c98a00"
CROP_GREY = "#9a9a9a"


def _light(color, amount=0.55):
    from matplotlib.colors import to_rgb
    r, g, b = to_rgb(color)
    return (1 - amount * (1 - r), 1 - amount * (1 - g), 1 - amount * (1 - b))


class Panel:
    """One matrix drawn as a grid of cells.

    ``cells[r][c]`` is a dict: ``text``, optional ``sub`` (small second line), ``fills`` (list of
    colours, drawn as vertical stripes), ``hatch`` (cropped/padding), ``text_color``, ``bold``,
    ``edge`` (colour of a thicker cell border), ``dashed`` (dashed border).
    """

    def __init__(self, cells, title, caption=(), title_color="black", row_label="row", col_label="col",
                 frames=(), op_before=None, show_rows=True, cell=CELL):
        self.cells = cells
        self.cell = cell
        self.nrows, self.ncols = len(cells), len(cells[0])
        self.title, self.title_color = title, title_color
        self.caption = []
        chars = max(12, int((LEFT + len(cells[0]) * cell + GAP) * 72 / (0.55 * 7.5)))
        for c in caption:
            if c:
                self.caption += textwrap.wrap(c, chars)
        self.row_label, self.col_label = row_label, col_label
        self.frames = frames          # (r0, c0, r1, c1, color, linestyle) in cell units, inclusive
        self.op_before = op_before    # a symbol drawn in the gap before this panel
        self.show_rows = show_rows

    @property
    def width(self):
        # wide enough for the title too, so neighbouring titles never overlap
        return max(LEFT + self.ncols * self.cell + RIGHT, 0.6 * 10 / 72 * len(self.title) + 0.3)

    @property
    def height(self):
        return TOP + self.nrows * self.cell + BOTTOM_LINE * len(self.caption) + 0.12

    def draw(self, fig, x0, y_top, W, H):
        from matplotlib.patches import Rectangle
        w, h = self.ncols * self.cell, self.nrows * self.cell
        x0 += (self.width - (LEFT + w + RIGHT)) / 2
        ax = fig.add_axes(((x0 + LEFT) / W, (H - y_top - TOP - h) / H, w / W, h / H))
        ax.set_xlim(-0.5, self.ncols - 0.5)
        ax.set_ylim(self.nrows - 0.5, -0.5)
        ax.set_aspect("equal")
        for s in ax.spines.values():
            s.set_visible(False)
        ax.xaxis.tick_top()
        ax.set_xticks(range(self.ncols))
        ax.set_xticklabels([str(c) for c in range(self.ncols)], fontsize=7, color="#555")
        ax.xaxis.set_label_position("top")
        ax.set_xlabel(self.col_label, fontsize=7, color="#555", labelpad=2)
        if self.show_rows:
            ax.set_yticks(range(self.nrows))
            ax.set_yticklabels([str(r) for r in range(self.nrows)], fontsize=7, color="#555")
            ax.set_ylabel(self.row_label, fontsize=7, color="#555", labelpad=2)
        else:
            ax.set_yticks([])
        ax.tick_params(length=0, pad=2)
        longest = max(len(c.get("text", "")) for r in self.cells for c in r)
        size = min(11.0, self.cell * 72 / (0.62 * max(longest, 1) + 1.1))
        for r, row in enumerate(self.cells):
            for c, cell in enumerate(row):
                fills = cell.get("fills") or ["white"]
                n = len(fills)
                for i, col in enumerate(fills):
                    ax.add_patch(Rectangle((c - 0.5 + i / n, r - 0.5), 1 / n, 1, facecolor=col, edgecolor="none"))
                if cell.get("hatch"):
                    ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor=(1, 1, 1, 0.55),
                                           edgecolor=CROP_GREY, hatch="///", linewidth=0))
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="#b0b0b0", linewidth=0.6))
                if cell.get("edge"):
                    ax.add_patch(Rectangle((c - 0.42, r - 0.42), 0.84, 0.84, fill=False, edgecolor=cell["edge"],
                                           linewidth=1.6, linestyle="--" if cell.get("dashed") else "-"))
                text = cell.get("text", "")
                dy = -0.12 if cell.get("sub") else 0
                if text:
                    ax.text(c, r + dy, text, ha="center", va="center", fontsize=size,
                            color=cell.get("text_color", "black"), fontweight="bold" if cell.get("bold") else "normal")
                if cell.get("sub"):
                    ax.text(c, r + 0.3, cell["sub"], ha="center", va="center", fontsize=6.5,
                            color=cell.get("sub_color", "#333"))
        for r0, c0, r1, c1, color, style in self.frames:
            ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False, edgecolor=color,
                                   linewidth=2.2 if style == "-" else 1.3, linestyle=style, zorder=5))
        cx = (x0 + LEFT + w / 2) / W
        fig.text(cx, (H - y_top - 0.2) / H, self.title, ha="center", va="center", fontsize=10,
                 color=self.title_color, fontweight="bold")
        for i, line in enumerate(self.caption):
            fig.text(cx, (H - y_top - TOP - h - 0.13 - i * BOTTOM_LINE) / H, line, ha="center", va="center",
                     fontsize=7.5, color="#222")
        if self.op_before:
            x0 -= (self.width - (LEFT + w + RIGHT)) / 2
            fig.text((x0 - GAP / 2 + 0.05) / W, (H - y_top - TOP - h / 2) / H, self.op_before, ha="center",
                     va="center", fontsize=15 if len(self.op_before) == 1 else 9, color="#333", linespacing=1.1)


def _layout_and_draw(header, rows, legend=None):
    """``rows``: lists of panels, placed left to right; ``legend``: (handles, title) beside row 0."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    widths = [sum(p.width for p in row) + GAP * max(len(row) - 1, 0) +
              (GAP if row and row[0].op_before else 0) for row in rows]
    W = max(widths + [0]) + 2 * MARGIN
    if legend is not None:
        W = max(W, widths[0] + 2 * MARGIN + LEGEND_W + 0.2)
    W = max(W, 6.4)
    chars = int(W * 72 / (0.55 * 9.5))
    head = []
    for para in header:
        head += textwrap.wrap(para, chars) or [""]
    heights = [max(p.height for p in row) + 0.1 for row in rows]
    if legend is not None:
        heights[0] = max(heights[0], 0.35 + 0.19 * len(legend[0]))
    H = MARGIN + HEADER_LINE * len(head) + 0.15 + sum(heights) + MARGIN
    fig = Figure(figsize=(W, H))
    FigureCanvasAgg(fig)
    for i, line in enumerate(head):
        fig.text(MARGIN / W, (H - MARGIN - i * HEADER_LINE) / H, line, ha="left", va="top",
                 fontsize=11 if i == 0 else 9.5, fontweight="bold" if i == 0 else "normal", color="#111")
    y = MARGIN + HEADER_LINE * len(head) + 0.15
    for row, height in zip(rows, heights):
        x = MARGIN + (GAP if row and row[0].op_before else 0)
        for p in row:
            p.draw(fig, x, y, W, H)
            x += p.width + GAP
        if row is rows[0] and legend is not None:
            handles, title = legend
            fig.legend(handles=handles, title=title, loc="upper left", fontsize=8, title_fontsize=8.5,
                       bbox_to_anchor=((x - GAP + 0.3) / W, (H - y - 0.05) / H), frameon=False,
                       handlelength=1.6, borderaxespad=0)
        y += height
    return fig


def _slices(a):
    if a.ndim == 1:
        return [(None, a[None, :])]
    if a.ndim == 2:
        return [(None, a)]
    return [(d, a[d]) for d in range(a.shape[0])]


def _plain(a2, fill=None, faint=False):
    return [[{"text": fmt_num(v), "fills": [fill] if fill else None, "text_color": "#888" if faint else "black"}
             for v in row] for row in a2]


def _labels(nd, prefix=""):
    if nd == 1:
        return dict(col_label=f"{prefix}position", show_rows=False)
    return dict(row_label=f"{prefix}row", col_label=f"{prefix}col")


def _factor(v):
    t = fmt_num(v)
    return f"({t})" if t.startswith("-") else t


def _span(a, b):
    return str(a) if a == b else f"{a}–{b}"


def _idx(name, idx):
    return f"{name}[{','.join(map(str, idx))}]"


def _dims(a):
    return "×".join(map(str, a.shape))


def build(e):
    return _build_transposed(e) if e.transposed else _build_conv(e)


# --------------------------------------------------------------------------- transposed


def _build_transposed(e):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    g, x, nd = e.geometry, e.input, e.nd
    elems = list(np.ndindex(*x.shape))
    color = {idx: COLORS[n % len(COLORS)] for n, idx in enumerate(elems)}
    light = {idx: _light(c) for idx, c in color.items()}
    kinds = [[e.position_kind(d, p) for p in range(e.canvas.shape[d])] for d in range(nd)]

    def kind(full_idx):
        ks = [kinds[d][p] for d, p in enumerate(full_idx)]
        for k in ("crop", "zero", "op"):
            if k in ks:
                return k
        return "keep"

    def owners(full_idx):
        return [el for el in elems if e.footprints[el + tuple(full_idx)]]

    def lift(idx2, depth):
        """Index of a drawn 2-D cell in the n-d array."""
        return (idx2[1],) if nd == 1 else idx2 if nd == 2 else (depth,) + idx2

    frame = []
    if nd <= 2:
        (r0, r1) = (0, 1) if nd == 1 else e.crop[0]
        (c0, c1) = e.crop[-1]
        frame = [(r0 if nd == 2 else 0, c0, (r1 - 1) if nd == 2 else 0, c1 - 1, "black", "-")]

    header = [f"{e.op}: input {_dims(x)}, kernel {_dims(e.kernel)}, {e.params_text()}",
              "Each input element scales the whole kernel (its own colour) and the copy is added to the "
              "canvas, copies starting one stride apart. Summing the copies gives the full canvas; padding "
              "then crops its edges (hatched) and the output is what is left inside the black frame."]
    rows = []
    # row 1: input and kernel
    first = []
    for d, sl in _slices(x):
        cells = [[{"text": fmt_num(sl[r, c]), "fills": [light[lift((r, c), d)]]} for c in range(sl.shape[1])]
                 for r in range(sl.shape[0])]
        first.append(Panel(cells, "input x" + (f", depth {d}" if d is not None else ""), **_labels(nd)))
    for d, sl in _slices(e.kernel):
        first.append(Panel(_plain(sl, fill="#eeeeee"), "kernel w" + (f", depth {d}" if d is not None else ""),
                           **_labels(nd)))
    rows.append(first)

    # per-element copies (1-D and 2-D: small multiples on the full canvas)
    if nd <= 2:
        per_row = 1 if nd == 1 else PER_ROW_2D
        shown = elems[:MAX_PANELS_FIG]
        panels = []
        for idx in shown:
            contrib, foot = e.contributions[idx], e.footprints[idx]
            c2, f2 = (contrib[None], foot[None]) if nd == 1 else (contrib, foot)
            cells = [[{"text": fmt_num(c2[r, c]) if f2[r, c] else "", "fills": [light[idx]] if f2[r, c] else None}
                      for c in range(c2.shape[1])] for r in range(c2.shape[0])]
            corner = ", ".join(f"{i}·{s}" for i, s in zip(idx, g.stride))
            at = ", ".join(str(i * s) for i, s in zip(idx, g.stride))
            if nd == 1:
                cap = [f"{fmt_num(x[idx])} × w placed at {corner} = {at}"]
            else:
                cap = [f"{fmt_num(x[idx])} × w placed at ({corner}) = ({at})"]
            side = max(e.canvas.shape)
            panels.append(Panel(cells, f"{_idx('x', idx)} = {fmt_num(x[idx])}", cap, title_color=color[idx],
                                cell=CELL if side <= 6 else max(0.24, CELL * 6 / side),
                                frames=[f[:4] + ("#555", "--") for f in frame], op_before="+" if panels else None,
                                **_labels(nd, "canvas ")))
        for i in range(0, len(panels), per_row):
            rows.append(panels[i:i + per_row])
        if len(elems) > len(shown):
            header.append(f"(The first {len(shown)} of {len(elems)} copies are drawn; all are in .contributions.)")
    else:
        header.append("3-D: each depth slice is drawn on its own; the per-element copies are in .contributions.")

    # canvas and output
    last = []
    any_overlap = False
    crop_words = []
    for d in range(nd):
        a, b = e.crop[d]
        gone = [_span(0, a - 1) if a else "", _span(b, e.canvas.shape[d] - 1) if b < e.canvas.shape[d] else ""]
        crop_words.append(" and ".join(t for t in gone if t) or "none")
    for d, sl in _slices(e.canvas):
        cells = []
        for r in range(sl.shape[0]):
            row = []
            for c in range(sl.shape[1]):
                full = lift((r, c), d)
                who = owners(full)
                any_overlap |= len(who) > 1
                k = kind(full)
                cell = {"text": fmt_num(e.canvas[full]), "fills": [light[w] for w in who] or None, "bold": True}
                if k == "crop":
                    cell.update(hatch=True, text_color="#777", bold=False)
                elif k == "op":
                    cell.update(edge=GOLD)
                elif k == "zero":
                    cell.update(edge=GOLD, dashed=True)
                if len(who) > 1 and len(who) <= 3:
                    cell["sub"] = "+".join(fmt_num(e.contributions[w + tuple(full)]) for w in who)
                row.append(cell)
            cells.append(row)
        depth_note = ""
        if d is not None and kinds[0][d] == "crop":
            depth_note = " (cropped)"
        title = "full canvas = sum" if d is None else f"canvas, depth {d}{depth_note}"
        cap = [f"size {' × '.join(map(str, e.canvas.shape))} before cropping"] if d in (None, 0) else []
        if d in (None, 0):
            words = ("position",) if nd == 1 else ("rows", "cols") if nd == 2 else ("depths", "rows", "cols")
            cap.append("cropped " + ", ".join(f"{w} {c}" for w, c in zip(words, crop_words)))
        last.append(Panel(cells, title, cap, frames=frame, op_before="=" if nd <= 2 else None,
                          **_labels(nd, "canvas ")))
    rows.append(last)
    out_row = []
    words = ("positions",) if nd == 1 else ("rows", "cols") if nd == 2 else ("depths", "rows", "cols")
    where = ", ".join(f"{w} {a}–{b - 1}" for w, (a, b) in zip(words, e.crop))
    for d, sl in _slices(e.output):
        cells = []
        for r in range(sl.shape[0]):
            row = []
            for c in range(sl.shape[1]):
                oidx = lift((r, c), d)
                full = tuple(i + a for i, (a, _) in zip(oidx, e.crop))
                who = owners(full)
                row.append({"text": fmt_num(e.output[oidx]), "fills": [light[w] for w in who] or None, "bold": True})
            cells.append(row)
        title = f"output ({_dims(e.output)})" if d is None else f"output, depth {d}"
        cap = [f"canvas {where}", f"= ndconv.{e.op}(x, w)"] if d in (None, 0) else []
        out_row.append(Panel(cells, title, cap, op_before="crop\n→" if (nd <= 2 and d in (None, 0)) else None,
                             **_labels(nd, "output ")))
    if nd <= 2:
        rows[-1] += out_row
    else:
        rows.append(out_row)

    handles = [Patch(facecolor=light[el], edgecolor="#888", label=f"copy from {_idx('x', el)} = {fmt_num(x[el])}")
               for el in elems[:8]]
    if len(elems) > 8:
        handles.append(Patch(facecolor="white", edgecolor="#888", label=f"... one colour per element ({len(elems)})"))
    if any_overlap:
        handles.append(Patch(facecolor="white", edgecolor="#888", hatch="||", label="stripes: copies that overlap add up"))
    if any(k == "crop" for ks in kinds for k in ks):
        handles.append(Patch(facecolor="white", edgecolor=CROP_GREY, hatch="///", label="cropped by padding"))
    if nd <= 2:
        handles.append(Line2D([], [], color="black", linewidth=2.2, label="kept: the output"))
        handles.append(Line2D([], [], color="#555", linewidth=1.3, linestyle="--",
                              label="where the output will be"))
    if any(k == "op" for ks in kinds for k in ks):
        handles.append(Patch(facecolor="white", edgecolor=GOLD, linewidth=1.6, label="kept by output_padding"))
    if any(k == "zero" for ks in kinds for k in ks):
        handles.append(Patch(facecolor="white", edgecolor=GOLD, linestyle="--", linewidth=1.6,
                             label="zeros added by output_padding"))
    return _layout_and_draw(header, rows, (handles, "legend"))


MAX_PANELS_FIG = 16


# --------------------------------------------------------------------------- convolution


def _build_conv(e):
    from matplotlib.patches import Patch
    g, x, w, nd = e.geometry, e.input, e.kernel, e.nd
    outs = list(np.ndindex(*e.output.shape))
    color = {o: COLORS[n % len(COLORS)] for n, o in enumerate(outs)}
    taps = list(np.ndindex(*w.shape))
    pads = any(g.pad_lo) or any(g.pad_hi)

    def inside(pidx):
        return all(a <= p < a + n for p, a, n in zip(pidx, g.pad_lo, x.shape))

    def lift(idx2, depth):
        return (idx2[1],) if nd == 1 else idx2 if nd == 2 else (depth,) + idx2

    header = [f"{e.op}: input {_dims(x)}, kernel {_dims(w)}, {e.params_text()}",
              "Each output cell multiplies the kernel with one window of the " + ("padded " if pads else "") +
              "input and sums the products. The window moves by the stride; its taps are the dilation apart."
              + (" Padding (hatched) reads as zeros." if pads else "")]
    rows = []
    first = []
    for d, sl in _slices(x):
        first.append(Panel(_plain(sl), "input x" + (f", depth {d}" if d is not None else ""), **_labels(nd)))
    if pads:
        for d, sl in _slices(e.padded):
            cells = [[{"text": fmt_num(sl[r, c]), "hatch": not inside(lift((r, c), d)),
                       "text_color": "black" if inside(lift((r, c), d)) else "#777"}
                      for c in range(sl.shape[1])] for r in range(sl.shape[0])]
            first.append(Panel(cells, "padded input" + (f", depth {d}" if d is not None else ""),
                               op_before="pad\n→" if d in (None, 0) else None, **_labels(nd)))
    for d, sl in _slices(w):
        first.append(Panel(_plain(sl, fill="#eeeeee"), "kernel w" + (f", depth {d}" if d is not None else ""),
                           **_labels(nd)))
    if nd == 3:
        rows += [[p] for p in []]
        rows.append(first[:x.shape[0]])
        rows.append(first[x.shape[0]:])
        header.append("3-D: each depth slice is drawn on its own; the window products are in .contributions.")
    else:
        rows.append(first)
        shown = outs[:MAX_PANELS_FIG]
        panels = []
        for o in shown:
            pos = e.windows(o)
            tap_at = {p: t for p, t in zip(pos, taps)}
            p2 = e.padded[None] if nd == 1 else e.padded
            cells = []
            for r in range(p2.shape[0]):
                row = []
                for c in range(p2.shape[1]):
                    pidx = lift((r, c), None)
                    cell = {"text": fmt_num(e.padded[pidx]), "text_color": "#aaa", "hatch": not inside(pidx)}
                    if pidx in tap_at:
                        cell = {"text": fmt_num(e.padded[pidx]), "fills": [_light(color[o])], "bold": True,
                                "sub": "×" + _factor(w[tap_at[pidx]]), "hatch": False}
                    row.append(cell)
                cells.append(row)
            terms = [fmt_num(e.contributions[o + t]) for t in taps]
            terms = [f"({t})" if t.startswith("-") else t for t in terms]
            line = " + ".join(terms)
            width_chars = (LEFT + p2.shape[1] * CELL) * 72 / (0.55 * 7.5)
            head = f"{_idx('y', o)} = "
            cap = [f"{head}{line} = {fmt_num(e.output[o])}" if len(head + line) + 6 < width_chars
                   else f"{head}sum of {len(taps)} products = {fmt_num(e.output[o])}"]
            panels.append(Panel(cells, f"window of {_idx('y', o)}", cap, title_color=color[o],
                                **_labels(nd, "padded " if pads else "")))
        per_row = 1 if nd == 1 else PER_ROW_2D
        for i in range(0, len(panels), per_row):
            rows.append(panels[i:i + per_row])
        if len(outs) > len(shown):
            header.append(f"(The first {len(shown)} of {len(outs)} windows are drawn; all products are in "
                          f".contributions.)")
    out_row = []
    for d, sl in _slices(e.output):
        cells = [[{"text": fmt_num(sl[r, c]), "bold": True,
                   "fills": [_light(color[lift((r, c), d)])] if nd < 3 else None}
                  for c in range(sl.shape[1])] for r in range(sl.shape[0])]
        out_row.append(Panel(cells, f"output y ({_dims(e.output)})" + (f", depth {d}" if d is not None else ""),
                             [f"= ndconv.{e.op}(x, w)"] if d in (None, 0) else [], **_labels(nd, "output ")))
    rows.append(out_row)
    handles = []
    if nd < 3:
        handles.append(Patch(facecolor=_light(COLORS[0]), edgecolor="#888",
                             label="a window: x value, ×kernel tap below"))
        handles.append(Patch(facecolor="white", edgecolor="#888", label="grey: not read by this window"))
    if pads:
        handles.append(Patch(facecolor="white", edgecolor=CROP_GREY, hatch="///", label="padding (zeros)"))
    return _layout_and_draw(header, rows, (handles, "legend"))
