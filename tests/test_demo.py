"""``ndconv demo``: a short run, determinism, ``--evaluate``, the files, the errors.

Runs go through ``ndconv.cli.main`` in-process on a reduced data set (the hidden
``--samples``/``--heldout`` flags) so the whole file stays within about a minute
on a 2-core CPU; one run trains on the full default data set for half the
default epochs and checks the quality bar (held-out MSE <= 25% of the
mean-image MSE).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ndconv.backend import gpuarray
from ndconv.cli import main

h5py = pytest.importorskip("h5py")
pytest.importorskip("matplotlib")

SHORT = ["--epochs", "2", "--samples", "512", "--heldout", "64", "--no-progress"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def demo(*args):
    return main(["demo", *args])


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def read_params(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs with seed 3 and one with seed 4."""
    base = tmp_path_factory.mktemp("demo")
    outs = {}
    for key, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = str(base / key)
        assert demo(*SHORT, "--seed", str(seed), "--out", out) == 0
        outs[key] = out
    return outs


def test_short_run_writes_valid_files(runs):
    out = runs["a"]
    assert sorted(os.listdir(out)) == ["loss.png", "metrics.json", "model.h5", "reconstructions.png"]
    for name in ("loss.png", "reconstructions.png"):
        with open(os.path.join(out, name), "rb") as f:
            head = f.read(24)
        assert head[:8] == PNG_SIGNATURE
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        assert width >= 400 and height >= 200
    assert h5py.is_hdf5(os.path.join(out, "model.h5"))
    params = read_params(os.path.join(out, "model.h5"))
    assert len(params) == 8          # W and b of two Conv2D and two Deconv2D
    assert all(p.dtype == np.float32 and np.isfinite(p).all() for p in params.values())

    m = read_metrics(out)
    assert {"train_loss", "heldout_mse", "mean_image_mse", "seconds"} <= set(m)
    assert len(m["train_loss"]) == 2 and all(np.isfinite(m["train_loss"]))
    assert m["train_loss"][1] < m["train_loss"][0]          # it learns
    assert 0 < m["heldout_mse"] < m["mean_image_mse"] < 1
    assert m["seconds"] > 0
    assert m["config"]["seed"] == 3 and m["config"]["samples"] == 512


def test_same_seed_same_numbers(runs):
    a, b, c = (read_metrics(runs[k]) for k in "abc")
    for m in (a, b, c):
        del m["seconds"]
    assert a == b                    # bit for bit: JSON floats round-trip exactly
    pa, pb = (read_params(os.path.join(runs[k], "model.h5")) for k in "ab")
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert a["train_loss"] != c["train_loss"] and a["heldout_mse"] != c["heldout_mse"]


def test_evaluate_reproduces_heldout_mse(runs, capsys):
    capsys.readouterr()
    assert demo("--evaluate", "--out", runs["a"]) == 0
    text = capsys.readouterr().out
    recorded = read_metrics(runs["a"])["heldout_mse"]
    assert text.count(repr(recorded)) == 2 and "reproduced" in text


def test_evaluate_detects_a_different_model(runs, tmp_path, capsys):
    out = tmp_path / "swapped"
    out.mkdir()
    # seed 4's weights with seed 3's metrics: the recomputed MSE must disagree
    with open(os.path.join(runs["a"], "metrics.json")) as f:
        (out / "metrics.json").write_text(f.read())
    with open(os.path.join(runs["c"], "model.h5"), "rb") as f:
        (out / "model.h5").write_bytes(f.read())
    assert demo("--evaluate", "--out", str(out)) == 1
    assert "NOT reproduced" in capsys.readouterr().err


def test_evaluate_without_a_run_fails_clearly(tmp_path, capsys):
    assert demo("--evaluate", "--out", str(tmp_path / "nothing")) == 2
    err = capsys.readouterr().err
    assert "metrics.json does not exist" in err and "ndconv demo --out" in err


def test_evaluate_with_a_corrupt_model_fails_clearly(runs, tmp_path, capsys):
    out = tmp_path / "corrupt"
    out.mkdir()
    with open(os.path.join(runs["a"], "metrics.json")) as f:
        (out / "metrics.json").write_text(f.read())
    (out / "model.h5").write_bytes(b"not an HDF5 file")
    assert demo("--evaluate", "--out", str(out)) == 2
    assert "model.h5" in capsys.readouterr().err


@pytest.mark.skipif(gpuarray.gpu_available(), reason="a GPU is present")
def test_gpu_without_a_gpu_fails_clearly(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert demo(*SHORT, "--device", "gpu", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "--device gpu" in err and ("CuPy" in err or "GPU" in err)
    assert not out.exists()          # failed before any work


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--epochs", "x"], ["--seed", "-1"],
                                  ["--device", "tpu"], ["--samples", "0"]])
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exc:
        demo(*args)
    assert exc.value.code == 2
    assert args[0] in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert demo(*SHORT, "--out", str(f)) == 2
    assert "not a folder" in capsys.readouterr().err
    assert demo(*SHORT, "--out", str(f / "sub")) == 2      # cannot be created: fails before training
    assert "cannot create --out" in capsys.readouterr().err


def test_default_data_reaches_the_quality_bar_in_half_the_epochs(tmp_path, capsys):
    out = str(tmp_path / "quality")
    from ndconv.demo import DEFAULTS
    epochs = max(1, DEFAULTS["epochs"] // 2)
    assert demo("--epochs", str(epochs), "--no-progress", "--out", out) == 0
    m = read_metrics(out)
    assert m["config"]["samples"] == 4096 and m["config"]["heldout"] == 512
    assert m["heldout_mse"] <= 0.25 * m["mean_image_mse"], m
    assert "held-out MSE" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not gpuarray.gpu_available(), reason="needs CuPy and an NVIDIA GPU")
def test_gpu_run_is_deterministic_and_evaluates_on_both_devices(tmp_path, capsys):
    outs = [str(tmp_path / k) for k in ("g1", "g2")]
    for out in outs:
        assert demo(*SHORT, "--device", "gpu", "--seed", "3", "--out", out) == 0
    m1, m2 = (read_metrics(o) for o in outs)
    assert m1["config"]["device"] == "gpu"
    del m1["seconds"], m2["seconds"]
    assert m1 == m2
    assert m1["train_loss"][1] < m1["train_loss"][0] and m1["heldout_mse"] < m1["train_loss"][0]
    assert demo("--evaluate", "--device", "gpu", "--out", outs[0]) == 0
    assert demo("--evaluate", "--device", "cpu", "--out", outs[0]) == 0   # float rounding only
