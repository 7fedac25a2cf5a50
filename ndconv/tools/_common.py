"""Helpers shared by the ``shape``, ``solve`` and ``explain`` subcommands."""
from __future__ import annotations

import sys

OPS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")

# Names of the spatial dimensions, as frameworks print them.
DIM_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


class UserError(ValueError):
    """Bad command-line input: printed as one ``error: ...`` line, no traceback."""


def op_info(op):
    """``(nd, transposed)`` of an op name such as ``conv_transpose2d``."""
    if op not in OPS:
        raise UserError(f"unknown op {op!r}; choose one of {', '.join(OPS)}")
    return int(op[-2]), op.startswith("conv_transpose")


def int_list(text, name, minimum=None):
    """``"2,1"`` -> ``[2, 1]``; raises :class:`UserError` naming the option."""
    parts = [p.strip() for p in str(text).replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise UserError(f"{name} needs comma-separated integers, got {text!r}")
    out = []
    for p in parts:
        try:
            out.append(int(p))
        except ValueError:
            raise UserError(f"{name} needs comma-separated integers, got {text!r} ({p!r} is not an integer)") from None
    if minimum is not None and any(v < minimum for v in out):
        raise UserError(f"{name} values must be >= {minimum}, got {text!r}")
    return out


def per_dim(values, nd, name):
    """One value for every dim, or exactly ``nd`` values -> a tuple of ``nd`` ints."""
    if len(values) == 1:
        return tuple(values) * nd
    if len(values) != nd:
        raise UserError(f"{name} needs 1 or {nd} values for a {nd}-D op, got {len(values)}: "
                        f"{','.join(map(str, values))}")
    return tuple(values)


def padding_arg(text, nd):
    """``--padding``: one int, one per dim, ``2*nd`` ints as (lo, hi) per dim, or a padding string."""
    if str(text).strip() in ("same", "valid", "SAME", "VALID"):
        return str(text).strip()
    values = int_list(text, "--padding", minimum=0)
    if len(values) == 2 * nd and nd > 1:
        # (lo, hi) for every dim, in the dims' order: Paddle's flat list, which geometry accepts.
        return list(values)
    return per_dim(values, nd, "--padding")


def report_errors(fn):
    """Wrap ``run(args)``: bad input becomes one ``error:`` line on stderr and exit status 2."""
    def run(args):
        try:
            return fn(args)
        except (UserError, ValueError, TypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    run.__doc__ = fn.__doc__
    run.__name__ = fn.__name__
    return run


def fmt_num(v):
    """A number as a person writes it: integers without a trailing ``.0``."""
    v = float(v)
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}"
