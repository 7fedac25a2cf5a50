"""Procedurally generated grayscale images for the demo: no downloads, no files.

Each image is a dark square canvas holding one to three shapes drawn from four
kinds -- filled discs, rings, (rotated) squares and thick strokes -- at a random
position, size, angle and intensity.  Shapes are rasterised from signed distance
functions with a one-pixel soft edge, which anti-aliases them: the images are
smooth enough for a small autoencoder to learn, yet varied enough that predicting
the mean image is a poor baseline.

Everything is a pure function of ``seed`` (NumPy's ``default_rng``), so the same
seed gives bit-identical images on every machine.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SHAPE_KINDS", "make_shapes", "train_heldout"]

SHAPE_KINDS = ("disc", "ring", "square", "stroke")


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")
    return int(value)


def _coverage(sdf):
    """Signed distance (pixels, negative inside) -> ink coverage in [0, 1] with a 1-pixel ramp."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _draw_one(rng, yy, xx, size):
    """Coverage map of one random shape on a size x size grid of pixel centres."""
    kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
    # keep centres away from the border so most of each shape is visible
    cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
    if kind in ("disc", "ring"):
        r = rng.uniform(0.12, 0.3) * size
        d = np.hypot(yy - cy, xx - cx) - r
        if kind == "ring":
            half_width = rng.uniform(0.06, 0.1) * size
            d = np.abs(d) - half_width
    elif kind == "square":
        half = rng.uniform(0.1, 0.25) * size
        a = rng.uniform(0.0, np.pi / 2)
        u = np.cos(a) * (xx - cx) + np.sin(a) * (yy - cy)
        v = -np.sin(a) * (xx - cx) + np.cos(a) * (yy - cy)
        # exact signed distance to a box, so the soft edge has the same width everywhere
        qx, qy = np.abs(u) - half, np.abs(v) - half
        d = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    else:  # stroke: a thick segment through the centre
        length = rng.uniform(0.3, 0.7) * size
        a = rng.uniform(0.0, np.pi)
        dx, dy = np.cos(a) * length / 2, np.sin(a) * length / 2
        px, py = xx - (cx - dx), yy - (cy - dy)
        bx, by = 2 * dx, 2 * dy
        t = np.clip((px * bx + py * by) / (bx * bx + by * by), 0.0, 1.0)
        half_width = rng.uniform(0.05, 0.1) * size
        d = np.hypot(px - t * bx, py - t * by) - half_width
    return _coverage(d)


def make_shapes(n, size=16, seed=0, max_shapes=3):
    """``n`` images of ``size`` x ``size`` pixels as float32, shaped ``(n, 1, size, size)``.

    Pixel values lie in [0, 1]: a background of 0 and shapes of intensity 0.4..1
    combined by taking the brighter one where they overlap.  The same arguments
    always give the same array, bit for bit.
    """
    n = _check_positive_int("n", n, minimum=0)
    size = _check_positive_int("size", size, minimum=4)
    max_shapes = _check_positive_int("max_shapes", max_shapes)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got seed={seed!r}")
    rng = np.random.default_rng(int(seed))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    out = np.zeros((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        img = np.zeros((size, size))
        for _ in range(int(rng.integers(1, max_shapes + 1))):
            intensity = rng.uniform(0.4, 1.0)
            img = np.maximum(img, intensity * _draw_one(rng, yy, xx, size))
        out[i, 0] = img
    return out


def train_heldout(n_train, n_heldout, size=16, seed=0):
    """A training set and a held-out set drawn from independent streams of one seed.

    The two sets come from distinct child seeds of ``seed``, so changing
    ``n_train`` does not change the held-out images (and vice versa).
    """
    n_train = _check_positive_int("n_train", n_train)
    n_heldout = _check_positive_int("n_heldout", n_heldout)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got seed={seed!r}")
    train_seed, heldout_seed = (int(s.generate_state(1)[0])
                                for s in np.random.SeedSequence(int(seed)).spawn(2))
    return (make_shapes(n_train, size, train_seed), make_shapes(n_heldout, size, heldout_seed))
