"""Shape arithmetic and argument checking: the one place every engine and face uses.

Every call is described by a small immutable :class:`ConvGeometry` in *convolution*
terms: ``y = conv(x, w)`` with ``x`` of shape ``(N, Cx, *x_size)``, ``w`` of shape
``(Cy, Cx/G, *kernel)`` and ``y`` of shape ``(N, Cy, *y_size)``.  A transposed
convolution is the same geometry read the other way: its input is ``y`` and its
output is ``x``, so ``conv_transpose(y, w) == d conv / d x``.  The engines only ever
see this normalised form (channels-first, batched).

Output position ``o`` of ``y`` reads ``x[o*stride - pad_lo + k*dilation]`` for every
kernel tap ``k``; positions of ``x`` outside ``[0, x_size)`` read as zero.  ``y_size``
is stored explicitly, so a transposed convolution with output_padding (whose ``x``
may be longer than any window reaches) needs no special case.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
DATA_FORMATS = {1: ("NCL", "NLC"), 2: ("NCHW", "NHWC"), 3: ("NCDHW", "NDHWC")}


@dataclass(frozen=True)
class ConvGeometry:
    batch: int
    x_channels: int
    y_channels: int
    groups: int
    x_size: tuple
    y_size: tuple
    kernel: tuple
    stride: tuple
    dilation: tuple
    pad_lo: tuple
    pad_hi: tuple
    padding_mode: str = "zeros"

    @property
    def nd(self):
        return len(self.kernel)

    @property
    def x_shape(self):
        return (self.batch, self.x_channels) + self.x_size

    @property
    def y_shape(self):
        return (self.batch, self.y_channels) + self.y_size

    @property
    def w_shape(self):
        return (self.y_channels, self.x_channels // self.groups) + self.kernel

    @property
    def taps(self):
        return math.prod(self.kernel)

    @property
    def depthwise(self):
        """Each group reads one input channel (depthwise, with or without multiplier)."""
        return self.x_channels == self.groups and self.groups > 1

    def flops(self):
        """Multiply-adds of one forward pass, counted as 2 flops each."""
        return 2 * self.batch * self.y_channels * math.prod(self.y_size) * (
            self.x_channels // self.groups) * self.taps

    def with_zero_padding(self):
        """The geometry after the caller has padded x explicitly (non-zero padding modes)."""
        size = tuple(n + lo + hi for n, lo, hi in zip(self.x_size, self.pad_lo, self.pad_hi))
        zeros = (0,) * self.nd
        return replace(self, x_size=size, pad_lo=zeros, pad_hi=zeros, padding_mode="zeros")

    def with_batch(self, batch):
        return replace(self, batch=batch)


@dataclass(frozen=True)
class Layout:
    """How the caller's arrays differ from the canonical (N, C, *spatial) form."""
    channels_last: bool = False
    unbatched: bool = False


# ---------------------------------------------------------------- argument parsing

def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _fmt(v):
    return repr(v) if isinstance(v, str) else str(v)


def int_tuple(value, nd, name, minimum=None):
    """An int or a length-``nd`` sequence of ints, checked against ``minimum``."""
    if _is_int(value):
        out = (int(value),) * nd
    elif isinstance(value, (tuple, list)) and len(value) == nd and all(_is_int(v) for v in value):
        out = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{name} must be an int or a sequence of {nd} ints, got {name}={_fmt(value)}")
    if minimum is not None and any(v < minimum for v in out):
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {what}, got {name}={_fmt(value)}")
    return out


def parse_padding(padding, nd, kernel, stride, dilation, x_size, transposed, channels_last=False):
    """Return ``(pad_lo, pad_hi, dilation)`` from any accepted padding form.

    Accepted: int; ``nd`` ints; ``nd`` ``(lo, hi)`` pairs; ``2*nd`` ints in Paddle's
    ``[d_front, d_back, h_top, ...]`` order; PyTorch's ``'same'``/``'valid'``
    (convolution only); Paddle's ``'SAME'``/``'VALID'`` (which forces dilation 1).
    """
    if isinstance(padding, str):
        if padding in ("valid", "VALID"):
            if transposed and padding == "valid":
                raise ValueError("padding='valid' is a convolution option; transposed convolution "
                                 "takes ints or Paddle's 'SAME'/'VALID', got padding='valid'")
            return (0,) * nd, (0,) * nd, dilation
        if padding == "same":
            if transposed:
                raise ValueError("padding='same' is not defined for transposed convolution "
                                 "(PyTorch); use Paddle's padding='SAME' or explicit padding")
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' is not supported for strided convolutions, "
                                 f"got stride={stride}")
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            lo = tuple(t // 2 for t in total)
            return lo, tuple(t - l for t, l in zip(total, lo)), dilation
        if padding == "SAME":
            # Paddle: out = ceil(in / s) for convolution; dilation is forced to 1.
            lo, hi = [], []
            for n, k, s in zip(x_size, kernel, stride):
                o = -(-n // s)
                pad_sum = max((o - 1) * s + k - n, 0)
                lo.append(pad_sum // 2)
                hi.append(pad_sum - pad_sum // 2)
            return tuple(lo), tuple(hi), (1,) * nd
        raise ValueError(f"padding must be an int, a sequence, 'same', 'valid', 'SAME' or 'VALID', "
                         f"got padding={padding!r}")
    if _is_int(padding):
        lo = hi = (int(padding),) * nd
    elif isinstance(padding, (tuple, list)):
        items = list(padding)
        if len(items) == nd and all(_is_int(v) for v in items):
            lo = hi = tuple(int(v) for v in items)
        elif len(items) == 2 * nd and all(_is_int(v) for v in items):
            lo, hi = tuple(items[0::2]), tuple(items[1::2])
        elif len(items) in (nd, nd + 2) and all(
                isinstance(p, (tuple, list)) and len(p) == 2 and all(_is_int(v) for v in p) for p in items):
            if len(items) == nd + 2:
                # Paddle: one pair per dim of the data, in its layout; N and C must be (0, 0)
                nc = (0, -1) if channels_last else (0, 1)
                if any(tuple(items[i]) != (0, 0) for i in nc):
                    raise ValueError(f"padding pairs for the batch and channel dims must be (0, 0), "
                                     f"got padding={padding}")
                items = items[1:-1] if channels_last else items[2:]
            lo = tuple(int(p[0]) for p in items)
            hi = tuple(int(p[1]) for p in items)
        else:
            raise TypeError(f"padding must be an int, {nd} ints, {nd} (lo, hi) pairs or {2 * nd} ints, "
                            f"got padding={_fmt(padding)}")
    else:
        raise TypeError(f"padding must be an int, a sequence or a string, got padding={_fmt(padding)}")
    if any(v < 0 for v in lo + hi):
        raise ValueError(f"padding must be non-negative, got padding={_fmt(padding)}")
    return lo, hi, dilation


def parse_layout(shape, nd, data_format, op):
    """Check the input rank and data_format; return the canonical (N, C, *spatial) shape."""
    if data_format is None:
        channels_last = False
    else:
        if data_format not in DATA_FORMATS[nd]:
            raise ValueError(f"data_format must be one of {DATA_FORMATS[nd]} for {op}, "
                             f"got data_format={data_format!r}")
        channels_last = data_format == DATA_FORMATS[nd][1]
    if len(shape) not in (nd + 1, nd + 2):
        raise ValueError(f"Expected {nd + 1}D (unbatched) or {nd + 2}D (batched) input to {op}, "
                         f"but got input of size: {list(shape)}")
    unbatched = len(shape) == nd + 1
    if unbatched:
        shape = (1,) + tuple(shape)
    if channels_last:
        shape = (shape[0], shape[-1]) + tuple(shape[1:-1])
    return tuple(int(s) for s in shape), Layout(channels_last, unbatched)


def _check_weight(weight_shape, nd, op):
    if len(weight_shape) != nd + 2:
        raise ValueError(f"weight of {op} must have {nd + 2} dims (out, in/groups, *kernel), "
                         f"got weight of size {list(weight_shape)}")
    if any(k <= 0 for k in weight_shape[2:]):
        raise ValueError(f"kernel size must be positive, got weight of size {list(weight_shape)}")


def _check_bias(bias_shape, channels):
    if bias_shape is not None and tuple(bias_shape) != (channels,):
        raise ValueError(f"bias must have shape ({channels},), got bias of shape {tuple(bias_shape)}")


def _check_groups(groups):
    if not _is_int(groups):
        raise TypeError(f"groups must be an int, got groups={_fmt(groups)}")
    if groups <= 0:
        raise ValueError(f"groups must be a positive integer, got groups={groups}")
    return int(groups)


def _common_arguments(input_shape, weight_shape, groups, stride, dilation, data_format, op):
    """Checks shared by both directions; the dimension count follows the weight."""
    weight_shape = tuple(weight_shape)
    nd = len(weight_shape) - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"weight of {op} must have 3, 4 or 5 dims, got weight of size {list(weight_shape)}")
    _check_weight(weight_shape, nd, op)
    shape, layout = parse_layout(input_shape, nd, data_format, op)
    return (weight_shape, nd, shape, layout, _check_groups(groups), int_tuple(stride, nd, "stride", 1),
            int_tuple(dilation, nd, "dilation", 1))


_LIST = object()     # marks a list in a memo key, so [1, 2] and (1, 2) stay apart


def _memo_key(v):
    """``v`` as a hashable key that never equates values the checks treat differently
    (``True``/``1.0``/``np.int64(1)`` against ``1``): plain ints, strings and None only."""
    t = type(v)
    if t is int or t is str or v is None:
        return v
    if t is tuple:
        # the common cases, kept as they are: a shape, and the argument tuple of a call
        # whose values are ints, strings, None and shapes (one pass, no recursion)
        for e in v:
            te = type(e)
            if te is int or te is str or e is None:
                continue
            if te is tuple and all(type(i) is int for i in e):
                continue
            return tuple(_memo_key(e) for e in v)
        return v
    if t is list:
        return (_LIST,) + tuple(_memo_key(e) for e in v)
    raise TypeError("not memoizable")


def _memoized(parse):
    """Remember the results of a geometry parser by its arguments.

    Layers call the same few geometries over and over; on a GPU the checks would
    otherwise cost as much as a small convolution.  Only successful results are
    kept, so every bad call still raises its own error; arguments of other types
    than int, str, None and their tuples or lists skip the memo.
    """
    memo = {}

    def parsed(*args, **kwargs):
        try:
            key = (_memo_key(args), _memo_key(tuple(sorted(kwargs.items())))) if kwargs else _memo_key(args)
        except TypeError:
            return parse(*args, **kwargs)
        out = memo.get(key)
        if out is None:
            out = parse(*args, **kwargs)
            if len(memo) >= 4096:
                memo.clear()
            memo[key] = out
        return out

    parsed.__doc__, parsed.__name__, parsed.__wrapped__ = parse.__doc__, parse.__name__, parse
    return parsed


@_memoized
def conv_geometry(input_shape, weight_shape, bias_shape=None, stride=1, padding=0, dilation=1,
                  groups=1, padding_mode="zeros", data_format=None, op="conv"):
    """Geometry of ``conv(input, weight)``; raises on every bad argument before any work."""
    weight_shape, nd, shape, layout, groups, stride, dilation = _common_arguments(
        input_shape, weight_shape, groups, stride, dilation, data_format, op)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got padding_mode={padding_mode!r}")
    c_out, c_in_g = weight_shape[:2]
    kernel = weight_shape[2:]
    n, c_in = shape[:2]
    x_size = shape[2:]
    if c_out % groups:
        raise ValueError(f"out_channels (weight.shape[0]={c_out}) must be divisible by groups={groups}")
    if c_in % groups:
        raise ValueError(f"in_channels must be divisible by groups={groups}, got an input with {c_in} channels")
    if c_in != c_in_g * groups:
        raise ValueError(f"Given groups={groups}, weight of size {list(weight_shape)}, expected "
                         f"input{list(input_shape)} to have {c_in_g * groups} channels, but got "
                         f"{c_in} channels instead")
    _check_bias(bias_shape, c_out)
    lo, hi, dilation = parse_padding(padding, nd, kernel, stride, dilation, x_size, transposed=False,
                                     channels_last=layout.channels_last)
    if padding_mode != "zeros":
        for size, a, b in zip(x_size, lo, hi):
            limit = size if padding_mode == "circular" else size - 1 if padding_mode == "reflect" else None
            if limit is not None and max(a, b) > limit:
                raise ValueError(f"padding_mode={padding_mode!r} needs padding at most {limit} for an "
                                 f"input size of {size}, got padding={padding}")
    padded = tuple(s + a + b for s, a, b in zip(x_size, lo, hi))
    span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    if any(p < e for p, e in zip(padded, span)):
        raise ValueError(f"Calculated padded input size per channel: ({' x '.join(map(str, padded))}). "
                         f"Kernel size: ({' x '.join(map(str, span))}). "
                         f"Kernel size can't be greater than actual input size")
    y_size = tuple((p - e) // s + 1 for p, e, s in zip(padded, span, stride))
    geom = ConvGeometry(n, c_in, c_out, groups, x_size, y_size, kernel, stride, dilation, lo, hi,
                        padding_mode)
    return geom, layout


def transposed_size_range(y_size, kernel, stride, dilation, lo, hi):
    """Per dim, the smallest transposed output (output_padding 0) and the largest allowed."""
    smallest = tuple((n - 1) * s - a - b + d * (k - 1) + 1
                     for n, k, s, d, a, b in zip(y_size, kernel, stride, dilation, lo, hi))
    return smallest, tuple(m + s - 1 for m, s in zip(smallest, stride))


@_memoized
def conv_transpose_geometry(input_shape, weight_shape, bias_shape=None, stride=1, padding=0,
                            output_padding=0, groups=1, dilation=1, output_size=None,
                            data_format=None, op="conv_transpose"):
    """Geometry of ``conv_transpose(input, weight)``: its input is the geometry's ``y``."""
    weight_shape, nd, shape, layout, groups, stride, dilation = _common_arguments(
        input_shape, weight_shape, groups, stride, dilation, data_format, op)
    output_padding = int_tuple(output_padding, nd, "output_padding", 0)
    c_in, c_out_g = weight_shape[:2]
    kernel = weight_shape[2:]
    n, c = shape[:2]
    y_size = shape[2:]
    if c_in % groups:
        raise ValueError(f"in_channels (weight.shape[0]={c_in}) must be divisible by groups={groups}")
    if c != c_in:
        raise ValueError(f"Given transposed=1, weight of size {list(weight_shape)}, expected "
                         f"input{list(input_shape)} to have {c_in} channels, but got {c} channels instead")
    c_out = c_out_g * groups
    _check_bias(bias_shape, c_out)
    if isinstance(padding, str) and padding == "SAME":
        # Paddle's transposed 'SAME': pads computed from the transposed input size.
        lo, hi, dilation = parse_padding(padding, nd, kernel, stride, dilation, y_size, transposed=True,
                                         channels_last=layout.channels_last)
    else:
        lo, hi, dilation = parse_padding(padding, nd, kernel, stride, dilation, None, transposed=True,
                                         channels_last=layout.channels_last)
    smallest, largest = transposed_size_range(y_size, kernel, stride, dilation, lo, hi)
    if output_size is not None:
        if any(output_padding):
            raise ValueError(f"output_size and output_padding are exclusive, got "
                             f"output_size={output_size} and output_padding={output_padding}")
        if isinstance(output_size, numbers.Integral):
            output_size = (output_size,) * nd
        output_size = tuple(output_size)
        if len(output_size) == nd + 2:
            output_size = output_size[2:]
        if not all(_is_int(v) for v in output_size):
            raise TypeError(f"output_size must hold ints, got output_size={output_size}")
        if len(output_size) != nd:
            raise ValueError(f"output_size must have {nd} or {nd + 2} ints, got output_size={output_size}")
        for want, a, b in zip(output_size, smallest, largest):
            if not a <= want <= b:
                raise ValueError(f"requested an output size of {list(output_size)}, but valid sizes range "
                                 f"from {list(smallest)} to {list(largest)} (for an input of {list(y_size)})")
        output_padding = tuple(int(w) - a for w, a in zip(output_size, smallest))
    else:
        for op_, s, d in zip(output_padding, stride, dilation):
            if op_ >= max(s, d):
                raise ValueError(f"output_padding must be smaller than either stride or dilation, got "
                                 f"output_padding={output_padding}, stride={stride}, dilation={dilation}")
    x_size = tuple(m + p for m, p in zip(smallest, output_padding))
    if any(v <= 0 for v in x_size):
        raise ValueError(f"Given input size per channel: {list(y_size)}, calculated output size per "
                         f"channel: {list(x_size)}. Output size is too small")
    geom = ConvGeometry(n, c_out, c_in, groups, x_size, y_size, kernel, stride, dilation, lo, hi)
    return geom, layout
