"""``ndconv demo``: train a small convolutional autoencoder end to end.

The whole library in one command: generated images (:mod:`ndconv.datasets`),
modules (``Conv2D``, ``Deconv2D``, activations) in a ``Sequential``, forward and
backward through the engine, the MSE cost, Adam, evaluation on held-out images,
pictures, and ``save``/``load`` of the trained parameters.

The network (28x28 grayscale in, 4x7x7 = 196 numbers in the middle, a 4x
compression)::

    Conv2D(1, 16, 4, stride=2, pad=1)   -> 16 x 14 x 14, ReLU
    Conv2D(16, 4, 4, stride=2, pad=1)   ->  4 x  7 x  7, ReLU   (the code)
    Deconv2D(4, 16, 4, stride=2, pad=1) -> 16 x 14 x 14, ReLU
    Deconv2D(16, 1, 4, stride=2, pad=1) ->  1 x 28 x 28, Sigmoid

Outputs, in ``--out`` (default ``./ndconv-demo``): ``metrics.json`` (``train_loss``
per epoch, ``heldout_mse``, ``mean_image_mse`` -- the held-out MSE of always
predicting the mean training image -- ``seconds`` and the ``config``),
``reconstructions.png``, ``loss.png`` and ``model.h5``.  ``--evaluate`` rebuilds
the network, loads ``model.h5`` and recomputes the held-out MSE.

Everything is a function of ``--seed``: the images, the initial weights and the
batch order, so two runs with one seed write the same numbers (all but
``seconds``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np

from .cli import int_at_least

__all__ = ["add_arguments", "run", "build_autoencoder", "DEFAULTS"]

DEFAULTS = dict(epochs=6, samples=4096, heldout=512, image_size=28, batch_size=32, learn_rate=2e-3)
EVAL_BATCH = 256
# --evaluate tolerates this relative difference: float32 sums taken in another
# order (e.g. trained on the GPU, evaluated on the CPU) differ by about 1e-7.
EVAL_RTOL = 1e-5


# ---------------------------------------------------------------------------- arguments


def add_arguments(parser):
    parser.add_argument("--epochs", type=int_at_least(1), default=DEFAULTS["epochs"],
                        help=f"passes over the training images (default {DEFAULTS['epochs']})")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where to train: cpu (NumPy) or gpu (CuPy, needs an NVIDIA GPU); default cpu")
    parser.add_argument("--out", default="ndconv-demo", metavar="DIR",
                        help="folder for metrics.json, reconstructions.png, loss.png, model.h5 "
                             "(default ./ndconv-demo)")
    parser.add_argument("--seed", type=int_at_least(0), default=0,
                        help="seed of the images, the initial weights and the batch order (default 0)")
    parser.add_argument("--evaluate", action="store_true",
                        help="do not train: reload DIR/model.h5 and recompute the held-out MSE "
                             "recorded in DIR/metrics.json")
    # Hidden knobs for tests and experiments; the defaults are the documented demo.
    parser.add_argument("--samples", type=int_at_least(1), default=DEFAULTS["samples"], help=argparse.SUPPRESS)
    parser.add_argument("--heldout", type=int_at_least(1), default=DEFAULTS["heldout"], help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int_at_least(1), default=DEFAULTS["batch_size"], help=argparse.SUPPRESS)
    parser.add_argument("--learn-rate", type=float, default=DEFAULTS["learn_rate"], help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------- the network


def build_autoencoder(seed=0):
    """The demo's network, its initial weights drawn from ``seed`` (host arrays, float32)."""
    from .activations import ReLU, Sigmoid
    from .containers import Sequential
    from .modules import Conv2D, Deconv2D

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1]))
    net = Sequential(name="autoencoder")
    net.append(Conv2D(1, 16, 4, stride=2, pad=1, name="enc1", rng=rng))
    net.append(ReLU(name="relu1"))
    net.append(Conv2D(16, 4, 4, stride=2, pad=1, name="enc2", rng=rng))
    net.append(ReLU(name="code"))
    net.append(Deconv2D(4, 16, 4, stride=2, pad=1, name="dec1", rng=rng))
    net.append(ReLU(name="relu3"))
    net.append(Deconv2D(16, 1, 4, stride=2, pad=1, name="dec2", rng=rng))
    net.append(Sigmoid(name="out"))
    return net


# ---------------------------------------------------------------------------- helpers


def _fail(message, code=2):
    print(f"ndconv demo: error: {message}", file=sys.stderr)
    return code


def _missing_modules():
    return [m for m in ("matplotlib", "h5py") if importlib.util.find_spec(m) is None]


def _gpu_problem():
    """None when --device gpu can run, else the reason it cannot."""
    from .backend import gpuarray
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install \"ndconv[gpu]\"), so there is no GPU to train on"
    if os.environ.get("NDCONV_DEVICE", "").lower() == "cpu":
        return "NDCONV_DEVICE=cpu is set, which hides the GPU"
    if not gpuarray.gpu_available():
        return "CuPy is installed but no CUDA device answers (no GPU, or no working driver)"
    return None


def _datasets(config):
    from .datasets import train_heldout
    return train_heldout(config["samples"], config["heldout"], config["image_size"], config["seed"])


def _sq_error_sum(pred, target):
    """Sum of squared errors in float64 on the host: exact to reproduce in --evaluate."""
    from .backend import gpuarray
    d = gpuarray.to_host(pred).astype(np.float64) - gpuarray.to_host(target).astype(np.float64)
    return float(np.dot(d.ravel(), d.ravel()))


def heldout_mse(net, heldout, device="cpu"):
    """Mean squared error of ``net`` on ``heldout`` (host float32 images), in eval mode."""
    from .backend import gpuarray
    net.evalMode()
    total = 0.0
    for b0 in range(0, len(heldout), EVAL_BATCH):
        x = heldout[b0:b0 + EVAL_BATCH]
        xd = gpuarray.to_gpu(x) if device == "gpu" else x
        total += _sq_error_sum(net(xd), x)
    net.trainMode()
    return total / heldout.size


def _reconstruct(net, images, device):
    from .backend import gpuarray
    net.evalMode()
    x = gpuarray.to_gpu(images) if device == "gpu" else images
    out = gpuarray.to_host(net(x)).copy()
    net.trainMode()
    return out


class _Progress:
    """tqdm over all batches when it is installed, else one line per epoch."""

    def __init__(self, total, epochs, enabled):
        self.epochs = epochs
        self.bar = None
        if enabled and importlib.util.find_spec("tqdm") is not None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, unit="batch", file=sys.stderr, dynamic_ncols=True)
        self.enabled = enabled

    def epoch(self, e):
        if self.bar is not None:
            self.bar.set_description(f"epoch {e + 1}/{self.epochs}")

    def batch(self, loss):
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.5f}", refresh=False)
            self.bar.update(1)

    def epoch_done(self, e, loss):
        if self.bar is None and self.enabled:
            print(f"epoch {e + 1}/{self.epochs}: train loss {loss:.5f}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- pictures


def plot_reconstructions(path, inputs, outputs, heldout, mean_image):
    from matplotlib.figure import Figure

    n = len(inputs)
    fig = Figure(figsize=(1.0 * n + 1.4, 3.0), dpi=100)
    axes = fig.subplots(2, n, squeeze=False)
    for row, (images, label) in enumerate(((inputs, "held-out\ninput"), (outputs, "reconstruction"))):
        for i in range(n):
            ax = axes[row, i]
            ax.imshow(images[i, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(label, fontsize=10)
    fig.suptitle(f"ndconv demo: held-out MSE {heldout:.5f}  (mean-image MSE {mean_image:.5f}, "
                 f"ratio {heldout / mean_image:.1%})", fontsize=11)
    fig.subplots_adjust(left=0.09, right=0.99, top=0.86, bottom=0.03, wspace=0.06, hspace=0.08)
    fig.savefig(path)


def plot_loss(path, train_loss, batch_loss, batches_per_epoch, heldout, mean_image):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.subplots()
    steps = np.arange(1, len(batch_loss) + 1) / batches_per_epoch
    ax.plot(steps, batch_loss, color="0.75", lw=0.8, label="training batches")
    epochs = np.arange(1, len(train_loss) + 1)
    # an epoch mean sits in the middle of its epoch, over the batches it averages
    ax.plot(epochs - 0.5, train_loss, "o-", color="C0", label="training loss (epoch mean)")
    ax.axhline(heldout, color="C2", ls="--", label=f"held-out MSE {heldout:.5f}")
    ax.axhline(mean_image, color="C3", ls=":", label=f"mean-image MSE {mean_image:.5f}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean squared error")
    ax.set_title("ndconv demo: autoencoder training")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------------------- training


def train(config, out_dir, progress=True):
    """Run the demo for ``config``; write the four files; return the metrics dict."""
    from .backend import gpuarray
    from .cost import MSE
    from .optimizers import Adam

    start = time.perf_counter()
    device = config["device"]
    train_x, heldout_x = _datasets(config)
    mean_image = train_x.astype(np.float64).mean(axis=0)
    mean_image_mse = float(((heldout_x - mean_image) ** 2).mean())

    net = build_autoencoder(config["seed"])
    # modules put new weights on the GPU whenever one is present: say where explicitly
    net.moveTo(device)
    data = gpuarray.to_gpu(train_x) if device == "gpu" else train_x
    cost = MSE()
    opt = Adam(alpha=config["learn_rate"]).setupOn(net)
    order_rng = np.random.default_rng(np.random.SeedSequence([config["seed"], 2]))

    n, bs = len(train_x), config["batch_size"]
    per_epoch = math.ceil(n / bs)
    bar = _Progress(per_epoch * config["epochs"], config["epochs"], progress)
    train_loss, batch_loss = [], []
    try:
        for e in range(config["epochs"]):
            bar.epoch(e)
            perm = order_rng.permutation(n)
            if device == "gpu":
                perm = gpuarray.to_gpu(perm)
            total = 0.0
            for b0 in range(0, n, bs):
                x = data[perm[b0:b0 + bs]]
                error, grad = cost(net(x), x)
                net.backward(grad, updGrad=False)   # the input gradient is not needed
                opt.update()
                total += error * len(x)
                batch_loss.append(error)
                bar.batch(error)
            train_loss.append(total / n)
            bar.epoch_done(e, train_loss[-1])
            if not math.isfinite(train_loss[-1]):
                raise FloatingPointError(f"training diverged: the loss of epoch {e + 1} is {train_loss[-1]}")
    finally:
        bar.close()

    heldout = heldout_mse(net, heldout_x, device)
    os.makedirs(out_dir, exist_ok=True)
    net.save(os.path.join(out_dir, "model.h5"))
    shown = heldout_x[:10]
    plot_reconstructions(os.path.join(out_dir, "reconstructions.png"), shown, _reconstruct(net, shown, device),
                         heldout, mean_image_mse)
    plot_loss(os.path.join(out_dir, "loss.png"), train_loss, batch_loss, per_epoch, heldout, mean_image_mse)
    metrics = {
        "train_loss": train_loss,
        "heldout_mse": heldout,
        "mean_image_mse": mean_image_mse,
        "seconds": time.perf_counter() - start,
        "config": dict(config, network=repr(net)),
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    return metrics


def evaluate(out_dir, device):
    """Reload ``out_dir/model.h5``; return (recorded, recomputed) held-out MSE."""
    path = os.path.join(out_dir, "metrics.json")
    try:
        with open(path) as f:
            metrics = json.load(f)
        config = metrics["config"]
        recorded = float(metrics["heldout_mse"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: train first with `ndconv demo --out {out_dir}`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a metrics file written by ndconv demo ({exc})") from None
    _, heldout_x = _datasets(config)
    net = build_autoencoder(config["seed"])
    net.load(os.path.join(out_dir, "model.h5"))
    net.moveTo(device)
    return recorded, heldout_mse(net, heldout_x, device)


# ---------------------------------------------------------------------------- the command


def run(args):
    missing = _missing_modules()
    if missing:
        return _fail(f"the demo needs {' and '.join(missing)}: pip install \"ndconv[cli]\"")
    if args.device == "gpu":
        problem = _gpu_problem()
        if problem is not None:
            return _fail(f"--device gpu: {problem}. Run without --device gpu to train on the CPU.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return _fail(f"--out {args.out!r} exists and is not a folder")

    if args.evaluate:
        try:
            recorded, recomputed = evaluate(args.out, args.device)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return _fail(str(exc))
        same = math.isclose(recorded, recomputed, rel_tol=EVAL_RTOL, abs_tol=0.0)
        print(f"heldout_mse in metrics.json : {recorded!r}")
        print(f"heldout_mse from model.h5   : {recomputed!r}")
        if same:
            print("reproduced" + (" (bit for bit)" if recorded == recomputed else
                                  f" (relative difference {abs(recorded - recomputed) / recorded:.1e})"))
            return 0
        print(f"NOT reproduced: relative difference {abs(recorded - recomputed) / max(recorded, 1e-300):.3e} "
              f"exceeds {EVAL_RTOL:g}", file=sys.stderr)
        return 1

    if not (math.isfinite(args.learn_rate) and args.learn_rate > 0):
        return _fail(f"--learn-rate must be a positive number, got {args.learn_rate!r}")
    if args.batch_size > args.samples:
        return _fail(f"--batch-size {args.batch_size} is larger than --samples {args.samples}")
    config = dict(seed=args.seed, epochs=args.epochs, samples=args.samples, heldout=args.heldout,
                  image_size=DEFAULTS["image_size"], batch_size=args.batch_size,
                  learn_rate=args.learn_rate, device=args.device)
    try:   # make the folder first: an unwritable --out should fail before training, not after
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        return _fail(f"cannot create --out {args.out!r}: {exc.strerror or exc}")
    metrics = train(config, args.out, progress=not args.no_progress)
    ratio = metrics["heldout_mse"] / metrics["mean_image_mse"]
    print(f"trained {args.epochs} epochs on {args.samples} images in {metrics['seconds']:.1f} s ({args.device})")
    print(f"held-out MSE {metrics['heldout_mse']:.6f}, mean-image MSE {metrics['mean_image_mse']:.6f} "
          f"(ratio {ratio:.1%})")
    print(f"wrote {os.path.join(args.out, '')}{{metrics.json, reconstructions.png, loss.png, model.h5}}")
    return 0
