"""save/load of parameters in HDF5: round trips, atomic writes, clear errors, module untouched."""
import os

import numpy as np
import pytest

pytest.importorskip("h5py")
import h5py  # noqa: E402

from ndconv import gpuarray  # noqa: E402
from ndconv.containers import Sequential  # noqa: E402
from ndconv.modules import Conv2D, Conv3D, Deconv2D, Deconv3D  # noqa: E402
from ndconv.serialization import ParamFileError, read_params  # noqa: E402

host = gpuarray.to_host


def make_net(seed, empty=False):
    rng = np.random.default_rng(seed)
    net = Sequential(name="net")
    net.append(Conv2D(3, 6, 3, pad=1, groups=3, rng=rng, name="depthwise", empty=empty))
    net.append(Conv2D(6, 4, 1, rng=rng, empty=empty))
    inner = Sequential(name="decoder")
    inner.append(Deconv2D(4, 2, 4, stride=2, pad=1, rng=rng, empty=empty, name="up"))
    net.append(inner)
    if not empty:
        for name, var in net.vars.items():          # non-zero biases so they matter
            if name.endswith(".b"):
                var.data[...] = gpuarray.to_gpu(rng.standard_normal(var.shape).astype(np.float32))
    return net


def x_data():
    return gpuarray.to_gpu(np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32))


def test_round_trip_is_bit_identical(tmp_path):
    net = make_net(1)
    path = tmp_path / "net.h5"
    net.save(path)
    other = make_net(2)
    assert not np.array_equal(host(other(x_data())), host(net(x_data())))
    other.load(path)
    np.testing.assert_array_equal(host(other(x_data())), host(net(x_data())))
    stored = read_params(path)
    assert sorted(stored) == ["1.W", "1.b", "decoder.up.W", "decoder.up.b", "depthwise.W", "depthwise.b"]
    assert [p for p in os.listdir(tmp_path)] == ["net.h5"]        # no temporary left behind


def test_load_into_empty_modules(tmp_path):
    net = make_net(3)
    net.save(tmp_path / "p.h5")
    empty = make_net(0, empty=True)
    assert empty.vars == {}
    empty.load(str(tmp_path / "p.h5"))
    np.testing.assert_array_equal(host(empty(x_data())), host(net(x_data())))


def test_single_layer_keys_and_float64(tmp_path):
    conv = Deconv3D(2, 3, 2, stride=2, rng=4).calcMode(np.float64)
    conv.save(tmp_path / "d.h5")
    with h5py.File(tmp_path / "d.h5", "r") as f:
        assert f.attrs["format"] == "ndconv-params"
        assert sorted(f["params"]) == ["W", "b"]
        assert f["params/W"].dtype == np.float64
    fresh = Deconv3D(2, 3, 2, stride=2, rng=5).calcMode(np.float64)
    fresh.load(tmp_path / "d.h5")
    np.testing.assert_array_equal(host(fresh.W), host(conv.W))


def _snapshot(mod):
    return {k: host(v.data).copy() for k, v in mod.vars.items()}


def _unchanged(mod, snap):
    now = _snapshot(mod)
    return now.keys() == snap.keys() and all(np.array_equal(now[k], snap[k]) for k in snap)


def test_mismatched_files_raise_and_leave_module_untouched(tmp_path):
    net = make_net(6)
    net.save(tmp_path / "net.h5")
    # Different names.
    conv = Conv2D(3, 6, 3, pad=1, groups=3)
    snap = _snapshot(conv)
    with pytest.raises(ParamFileError, match=r"missing from the file: \['W', 'b'\]"):
        conv.load(tmp_path / "net.h5")
    assert _unchanged(conv, snap)
    # Same names, different shape: the first parameters must not be half-loaded.
    a = Sequential()
    a.append(Conv2D(3, 6, 3, name="depthwise", groups=3))
    a.append(Conv2D(6, 4, 1, name="x"))
    a.save(tmp_path / "a.h5")
    b = Sequential()
    b.append(Conv2D(3, 6, 3, name="depthwise", groups=3, rng=1))
    b.append(Conv2D(6, 5, 1, name="x"))
    snap = _snapshot(b)
    with pytest.raises(ParamFileError, match=r"'x.W' has shape \(4, 6, 1, 1\) in the file, the module expects "
                                             r"\(5, 6, 1, 1\)"):
        b.load(tmp_path / "a.h5")
    assert _unchanged(b, snap)
    # Dtype mismatch.
    c = Sequential()
    c.append(Conv2D(3, 6, 3, name="depthwise", groups=3))
    c.append(Conv2D(6, 4, 1, name="x"))
    c.calcMode(np.float16)
    snap = _snapshot(c)
    with pytest.raises(ParamFileError, match="dtype float32 in the file, the module expects float16"):
        c.load(tmp_path / "a.h5")
    assert _unchanged(c, snap)
    # A layer without bias against a file with bias.
    with pytest.raises(ParamFileError, match=r"not in the module: \['b'\]"):
        Conv2D(3, 6, 3, useBias=False).load(_save(Conv2D(3, 6, 3), tmp_path / "c.h5"))


def _save(mod, path):
    mod.save(path)
    return path


def test_corrupted_and_foreign_files(tmp_path):
    net = make_net(7)
    good = tmp_path / "good.h5"
    net.save(good)
    snap = _snapshot(net[0])
    raw = good.read_bytes()
    (tmp_path / "trunc.h5").write_bytes(raw[: len(raw) // 3])
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file at all" * 20)
    for name in ("trunc.h5", "junk.h5"):
        with pytest.raises(ParamFileError, match="cannot read .*corrupted or not HDF5"):
            net.load(tmp_path / name)
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["W"] = np.zeros(3)
    with pytest.raises(ParamFileError, match="not an ndconv parameter file"):
        net.load(tmp_path / "foreign.h5")
    with h5py.File(tmp_path / "strings.h5", "w") as f:
        f.attrs["format"] = "ndconv-params"
        f.attrs["version"] = 1
        f.create_group("params")["W"] = np.array([b"abc"])
    with pytest.raises(ParamFileError, match="'W' is not a float array"):
        Conv2D(1, 1, 1).load(tmp_path / "strings.h5")
    with pytest.raises(FileNotFoundError, match="no parameter file"):
        net.load(tmp_path / "missing.h5")
    assert _unchanged(net[0], snap)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.h5"
    old = Conv3D(1, 2, 2, rng=1)
    old.save(path)
    before = path.read_bytes()
    import ndconv.serialization as ser

    class Boom(Exception):
        pass

    real_file = h5py.File

    def exploding(name, mode="r", *a, **k):
        f = real_file(name, mode, *a, **k)
        if mode == "w":
            f.create_group("params")["half"] = np.zeros(1000)
            f.close()
            raise Boom("crash mid-save")
        return f

    monkeypatch.setattr(ser, "_h5py", lambda: type("H", (), {"File": staticmethod(exploding)}))
    with pytest.raises(Boom):
        Conv3D(1, 2, 2, rng=2).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.h5"]


def test_save_refuses_unset_parameters(tmp_path):
    with pytest.raises(ValueError, match=r"parameters \['W', 'b'\] are not set"):
        Conv2D(1, 1, 1, empty=True).save(tmp_path / "e.h5")
    assert not (tmp_path / "e.h5").exists()


def test_load_keeps_variable_objects_and_resets_grads(tmp_path):
    conv = Conv2D(2, 2, 2, rng=1)
    conv.save(tmp_path / "w.h5")
    other = Conv2D(2, 2, 2, rng=2)
    var = other.getVar("W")
    other(gpuarray.to_gpu(np.ones((1, 2, 3, 3), np.float32)))
    other.backward(gpuarray.to_gpu(np.ones((1, 2, 2, 2), np.float32)))
    other.load(tmp_path / "w.h5")
    assert other.getVar("W") is var
    np.testing.assert_array_equal(host(var.data), host(conv.W))
    assert np.all(host(var.grad) == 0)


def test_no_pickle_in_the_serialization_module():
    import inspect

    import ndconv.serialization as ser
    src = inspect.getsource(ser)
    assert "pickle" not in src.replace("nothing is pickled", "")
