"""Non-zero padding modes (reflect, replicate, circular), forward and gradient.

Written against an array module ``xp`` (NumPy or CuPy) so both engines share it.
The engines themselves only know zero padding: a non-zero mode pads ``x``
explicitly first, and its gradient folds the padded gradient back here.
"""
import numpy as np

_NUMPY_MODE = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def source_index(size, lo, hi, mode):
    """For each position of the padded axis, the index of the input it copies."""
    i = np.arange(-lo, size + hi)
    if mode == "reflect":
        i = np.abs(i)
        i = np.where(i >= size, 2 * (size - 1) - i, i)
    elif mode == "replicate":
        i = np.clip(i, 0, size - 1)
    elif mode == "circular":
        i = np.mod(i, size)
    else:
        raise ValueError(f"padding_mode must be 'reflect', 'replicate' or 'circular', got {mode!r}")
    return i


def pad(xp, x, lo, hi, mode):
    """Pad the spatial dims of ``x`` (N, C, *spatial)."""
    width = [(0, 0), (0, 0)] + list(zip(lo, hi))
    return xp.pad(x, width, mode=_NUMPY_MODE[mode])


def pad_backward(xp, grad, lo, hi, mode):
    """Gradient of :func:`pad`: every padded position adds back into its source."""
    for axis, (a, b) in enumerate(zip(lo, hi), start=2):
        if a == 0 and b == 0:
            continue
        size = grad.shape[axis] - a - b
        src = source_index(size, a, b, mode)
        fold = np.zeros((src.size, size), dtype=grad.dtype)   # (padded, size) 0/1 matrix
        fold[np.arange(src.size), src] = 1
        moved = xp.moveaxis(grad, axis, -1)                    # (..., padded)
        grad = xp.moveaxis(moved @ xp.asarray(fold), -1, axis)  # (..., size)
    return grad
