"""``ndconv solve``: every (kernel, stride, padding, output_padding, dilation) mapping one size to another.

The search is bounded (kernel <= 7, dilation <= 3, stride <= 4 by default; padding from 0
to the dilated kernel's overhang ``dilation*(kernel-1)``, output_padding below
``max(stride, dilation)``) and every candidate is run through :mod:`ndconv.geometry`,
so a listed candidate is one the library accepts and that gives exactly the wanted size.

Order, simplest first:
  1. undilated (dilation 1) before dilated, smaller dilation first;
  2. candidates whose kernel touches every position (of the input for a convolution, of
     the output for a transposed one) before those that leave positions out ("gaps");
  3. then by stride, kernel, padding and output_padding, smallest first.

    ndconv solve --input 32 --output 16                 # k3 s2 p1 among others
    ndconv solve --input 16 --output 32 --transposed    # k4 s2 p1 among others
"""
from __future__ import annotations

from dataclasses import dataclass

from ..geometry import conv_geometry, conv_transpose_geometry
from ._common import UserError, int_list, report_errors
from .shape import conv_line, transposed_line


@dataclass(frozen=True)
class Candidate:
    kernel: int
    stride: int
    padding: int
    dilation: int
    output_padding: int
    gaps: int          # positions the kernel never touches (input for conv, output for transposed)
    geometry: object

    def sort_key(self):
        return (self.dilation, self.gaps > 0, self.stride, self.kernel, self.padding, self.output_padding)


def _untouched(geom):
    """How many positions of the geometry's ``x`` no kernel tap reaches."""
    (n,), (m,), (k,), (s,), (d,), (lo,) = geom.x_size, geom.y_size, geom.kernel, geom.stride, \
        geom.dilation, geom.pad_lo
    touched = {o * s - lo + t * d for o in range(m) for t in range(k)}
    return n - sum(1 for i in touched if 0 <= i < n)


def solve(in_size, out_size, transposed=False, kernel=None, stride=None, dilation=None,
          max_kernel=7, max_stride=4, max_dilation=3):
    """All candidates mapping ``in_size`` to ``out_size`` in one dimension, simplest first."""
    for name, v in (("in_size", in_size), ("out_size", out_size), ("max_kernel", max_kernel),
                    ("max_stride", max_stride), ("max_dilation", max_dilation)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
    for name, v in (("kernel", kernel), ("stride", stride), ("dilation", dilation)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {name}={v!r}")
    kernels = [kernel] if kernel else range(1, max_kernel + 1)
    strides = [stride] if stride else range(1, max_stride + 1)
    dilations = [dilation] if dilation else range(1, max_dilation + 1)
    found = []
    for k in kernels:
        for d in dilations:
            if k == 1 and d > 1:
                continue  # dilation means nothing for a one-tap kernel
            for s in strides:
                for p in range(d * (k - 1) + 1):
                    for op in (range(max(s, d)) if transposed else (0,)):
                        try:
                            if transposed:
                                geom, _ = conv_transpose_geometry((1, 1, in_size), (1, 1, k), None, s, p, op,
                                                                  1, d)
                                got = geom.x_size[0]
                            else:
                                geom, _ = conv_geometry((1, 1, in_size), (1, 1, k), None, s, p, d)
                                got = geom.y_size[0]
                        except ValueError:
                            continue  # the library refuses this combination
                        if got == out_size:
                            found.append(Candidate(k, s, p, d, op, _untouched(geom), geom))
    found.sort(key=Candidate.sort_key)
    return found


def add_arguments(parser):
    parser.add_argument("--input", required=True, metavar="SIZE", help="input size (one spatial dim)")
    parser.add_argument("--output", required=True, metavar="SIZE", help="wanted output size")
    parser.add_argument("--transposed", action="store_true", help="solve for a transposed convolution")
    parser.add_argument("--kernel", metavar="K", help="fix the kernel size")
    parser.add_argument("--stride", metavar="S", help="fix the stride")
    parser.add_argument("--dilation", metavar="D", help="fix the dilation")
    parser.add_argument("--max-kernel", default="7", metavar="K", help="largest kernel tried (default 7)")
    parser.add_argument("--max-stride", default="4", metavar="S", help="largest stride tried (default 4)")
    parser.add_argument("--max-dilation", default="3", metavar="D", help="largest dilation tried (default 3)")
    parser.add_argument("--limit", metavar="N", help="print at most N candidates")


def _one(text, name):
    if text is None:
        return None
    values = int_list(text, name, minimum=1)
    if len(values) != 1:
        raise UserError(f"{name} takes one positive integer (sizes are solved per dimension), got {text!r}")
    return values[0]


@report_errors
def run(args):
    n_in, n_out = _one(args.input, "--input"), _one(args.output, "--output")
    limits = dict(kernel=_one(args.kernel, "--kernel"), stride=_one(args.stride, "--stride"),
                  dilation=_one(args.dilation, "--dilation"), max_kernel=_one(args.max_kernel, "--max-kernel"),
                  max_stride=_one(args.max_stride, "--max-stride"),
                  max_dilation=_one(args.max_dilation, "--max-dilation"))
    limit = _one(args.limit, "--limit")
    found = solve(n_in, n_out, args.transposed, **limits)
    what = "conv_transpose" if args.transposed else "conv"
    bounds = ", ".join(f"{name} {limits[name]}" if limits[name] else f"{name} <= {limits['max_' + name]}"
                       for name in ("kernel", "stride", "dilation"))
    if not found:
        print(f"error: no {what} maps {n_in} -> {n_out} with {bounds}; try larger limits"
              + ("" if args.transposed or n_out <= n_in else " or --transposed (the output is larger)"),
              file=__import__("sys").stderr)
        return 2
    print(f"{what} {n_in} -> {n_out}: {len(found)} candidate(s) with {bounds}, simplest first")
    print("(order: dilation, then no gaps before gaps, then stride, kernel, padding, output_padding)")
    print()
    head = "kernel stride padding dilation" + (" output_padding" if args.transposed else "")
    print(f"  {head}   check")
    shown = found if limit is None else found[:limit]
    for c in shown:
        g = c.geometry
        cols = f"{c.kernel:6d} {c.stride:6d} {c.padding:7d} {c.dilation:8d}"
        if args.transposed:
            cols += f" {c.output_padding:14d}"
            check = transposed_line("", n_in, c.padding, c.padding, c.dilation, c.kernel, c.stride,
                                    c.output_padding, g.x_size[0])[2:]
        else:
            check = conv_line("", n_in, c.padding, c.padding, c.dilation, c.kernel, c.stride, g.y_size[0])[2:]
            check = check.split("   (")[0]
        note = ""
        if c.gaps:
            where = "output" if args.transposed else "input"
            note = f"   gaps: {c.gaps} {where} position(s) untouched"
        print(f"  {cols}   {check}{note}")
    if len(shown) < len(found):
        print(f"  ... {len(found) - len(shown)} more (raise --limit)")
    return 0
