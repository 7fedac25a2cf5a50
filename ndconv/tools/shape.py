"""``ndconv shape``: the output shape of a convolution, with each dimension's formula filled in.

Every number comes from :mod:`ndconv.geometry` (the same code the library runs), so the
answer and any error are exactly what ``ndconv.conv2d`` & co. would give.  The formulas
are only *printed* here, filled in with the geometry's own values.

    ndconv shape conv2d --input 1,3,32,32 --out-channels 16 --kernel 3 --stride 2 --padding 1
    ndconv shape conv_transpose2d --input 1,16,16,16 --weight-shape 16,8,4,4 --stride 2 --padding 1
"""
from __future__ import annotations

from ..geometry import conv_geometry, conv_transpose_geometry, transposed_size_range
from ._common import DIM_NAMES, OPS, UserError, int_list, op_info, padding_arg, per_dim, report_errors

CONV_FORMULA = "out = floor((in + pad_lo + pad_hi - dilation*(kernel-1) - 1) / stride) + 1"
TRANSPOSED_FORMULA = "out = (in - 1)*stride - pad_lo - pad_hi + dilation*(kernel-1) + 1 + output_padding"


def add_arguments(parser):
    parser.add_argument("op", choices=OPS, help="the operation")
    parser.add_argument("--input", required=True, metavar="N,C,D...",
                        help="input shape, channels first: N,C then the spatial sizes (or C,... unbatched)")
    parser.add_argument("--weight-shape", metavar="O,I,K...",
                        help="full weight shape: conv (out, in/groups, *k); transposed (in, out/groups, *k)")
    parser.add_argument("--out-channels", type=str, metavar="C", help="output channels (with --kernel)")
    parser.add_argument("--kernel", metavar="K", help="kernel size, one value or one per dim (with --out-channels)")
    parser.add_argument("--stride", default="1", help="one value or one per dim, e.g. 2 or 2,1 (default 1)")
    parser.add_argument("--padding", default="0",
                        help="one value, one per dim, (lo,hi) per dim, or same/valid/SAME/VALID (default 0)")
    parser.add_argument("--dilation", default="1", help="one value or one per dim (default 1)")
    parser.add_argument("--groups", default="1", help="groups (default 1)")
    parser.add_argument("--output-padding", default="0", help="transposed only: extra size at the back edge")
    parser.add_argument("--output-size", metavar="D...", help="transposed only: the wanted spatial output size")


def _weight_shape(args, nd, transposed, in_shape):
    if args.weight_shape is not None:
        if args.out_channels is not None or args.kernel is not None:
            raise UserError("give either --weight-shape or --out-channels with --kernel, not both")
        return tuple(int_list(args.weight_shape, "--weight-shape", minimum=0))
    if args.out_channels is None or args.kernel is None:
        raise UserError("give --weight-shape, or --out-channels and --kernel")
    out_c = int_list(args.out_channels, "--out-channels", minimum=1)
    if len(out_c) != 1:
        raise UserError(f"--out-channels takes one integer, got {args.out_channels!r}")
    kernel = per_dim(int_list(args.kernel, "--kernel", minimum=1), nd, "--kernel")
    groups = int_list(args.groups, "--groups", minimum=1)[0]
    if len(in_shape) < 2:
        raise UserError(f"--input needs N,C and {nd} spatial sizes, got {','.join(map(str, in_shape))}")
    in_c = in_shape[-nd - 1]
    for name, c in (("input channels", in_c), ("--out-channels", out_c[0])):
        if c % groups:
            raise UserError(f"{name} ({c}) must be divisible by --groups {groups}")
    if transposed:
        return (in_c, out_c[0] // groups) + kernel
    return (out_c[0], in_c // groups) + kernel


def compute(args):
    """Parse the arguments and run the geometry; returns ``(geometry, input_shape, weight_shape, nd, transposed)``."""
    nd, transposed = op_info(args.op)
    in_shape = tuple(int_list(args.input, "--input", minimum=0))
    if len(in_shape) not in (nd + 1, nd + 2):
        raise UserError(f"--input for {args.op} needs N,C and {nd} spatial sizes ({nd + 2} values, or "
                        f"{nd + 1} unbatched), got {args.input!r}")
    w_shape = _weight_shape(args, nd, transposed, in_shape)
    stride = per_dim(int_list(args.stride, "--stride"), nd, "--stride")
    dilation = per_dim(int_list(args.dilation, "--dilation"), nd, "--dilation")
    padding = padding_arg(args.padding, nd)
    groups = int_list(args.groups, "--groups")
    if len(groups) != 1:
        raise UserError(f"--groups takes one integer, got {args.groups!r}")
    output_padding = per_dim(int_list(args.output_padding, "--output-padding"), nd, "--output-padding")
    if not transposed:
        if any(output_padding) or args.output_size is not None:
            raise UserError(f"--output-padding and --output-size apply to transposed ops only, not {args.op}")
        geom, _ = conv_geometry(in_shape, w_shape, None, stride, padding, dilation, groups[0], op=args.op)
    else:
        output_size = None
        if args.output_size is not None:
            output_size = per_dim(int_list(args.output_size, "--output-size"), nd, "--output-size")
        geom, _ = conv_transpose_geometry(in_shape, w_shape, None, stride, padding, output_padding,
                                          groups[0], dilation, output_size, op=args.op)
    return geom, in_shape, w_shape, nd, transposed


def conv_line(name, n, lo, hi, d, k, s, out):
    """``H: floor((32 + 1 + 1 - 1*(3-1) - 1) / 2) + 1 = 16``; ``out`` is the geometry's value."""
    num = n + lo + hi - d * (k - 1) - 1
    line = f"{name}: floor(({n} + {lo} + {hi} - {d}*({k}-1) - 1) / {s}) + 1 = {out}"
    dropped = num % s - hi
    if dropped > 0:
        # A remainder means the last positions of the padded input are never read; say so when
        # they are real input rather than padding (a common surprise with stride > 1).
        line += f"   (the last {dropped} input position(s) are never read)"
    return line


def transposed_line(name, n, lo, hi, d, k, s, op, out):
    return f"{name}: ({n} - 1)*{s} - {lo} - {hi} + {d}*({k}-1) + 1 + {op} = {out}"


def describe(geom, in_shape, w_shape, op, nd, transposed):
    """The text ``ndconv shape`` prints (a list of lines)."""
    names = DIM_NAMES[nd]
    lines = [op]
    w_kind = "(in_channels, out_channels/groups, *kernel)" if transposed else \
        "(out_channels, in_channels/groups, *kernel)"
    unbatched = len(in_shape) == nd + 1
    out_shape = geom.x_shape if transposed else geom.y_shape
    if unbatched:
        out_shape = out_shape[1:]
    lines.append(f"  input   {tuple(in_shape)}")
    lines.append(f"  weight  {tuple(w_shape)}   {w_kind}")
    lines.append(f"  output  {tuple(out_shape)}")
    lines.append(f"  groups {geom.groups}, stride {geom.stride}, padding lo {geom.pad_lo} hi {geom.pad_hi}, "
                 f"dilation {geom.dilation}")
    lines.append("")
    if not transposed:
        lines.append("  " + CONV_FORMULA)
        for i, name in enumerate(names):
            lines.append("  " + conv_line(name, geom.x_size[i], geom.pad_lo[i], geom.pad_hi[i],
                                          geom.dilation[i], geom.kernel[i], geom.stride[i], geom.y_size[i]))
        return lines
    smallest, largest = transposed_size_range(geom.y_size, geom.kernel, geom.stride, geom.dilation,
                                              geom.pad_lo, geom.pad_hi)
    lines.append("  " + TRANSPOSED_FORMULA)
    for i, name in enumerate(names):
        op_i = geom.x_size[i] - smallest[i]
        lines.append("  " + transposed_line(name, geom.y_size[i], geom.pad_lo[i], geom.pad_hi[i],
                                            geom.dilation[i], geom.kernel[i], geom.stride[i], op_i,
                                            geom.x_size[i]))
    lines.append("")
    ranges = ", ".join(f"{name} {a}..{b}" if a != b else f"{name} {a}"
                       for name, a, b in zip(names, smallest, largest))
    lines.append(f"  valid output_size: {ranges}")
    lines.append("  (--output-size picks one; it is realised as output_padding = output_size - min)")
    return lines


@report_errors
def run(args):
    geom, in_shape, w_shape, nd, transposed = compute(args)
    print("\n".join(describe(geom, in_shape, w_shape, args.op, nd, transposed)))
    return 0
