"""`ndconv shape`: output shapes and filled-in formulas, equal to what the library and PyTorch give."""
import pytest
import torch

from ndconv.cli import main


def _run(capsys, *argv):
    rc = main(["shape"] + list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_conv2d_formula_filled_in(capsys):
    rc, out, _ = _run(capsys, "conv2d", "--input", "1,3,32,32", "--out-channels", "16", "--kernel", "3",
                      "--stride", "2", "--padding", "1")
    assert rc == 0
    assert "output  (1, 16, 16, 16)" in out
    assert "H: floor((32 + 1 + 1 - 1*(3-1) - 1) / 2) + 1 = 16" in out
    assert "W: floor((32 + 1 + 1 - 1*(3-1) - 1) / 2) + 1 = 16" in out
    ref = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)(torch.zeros(1, 3, 32, 32))
    assert f"output  {tuple(ref.shape)}" in out


def test_conv_per_dim_values_and_dropped_input(capsys):
    rc, out, _ = _run(capsys, "conv2d", "--input", "2,4,10,9", "--weight-shape", "6,2,3,2", "--stride", "2,1",
                      "--dilation", "1,2", "--groups", "2")
    assert rc == 0
    ref = torch.nn.functional.conv2d(torch.zeros(2, 4, 10, 9), torch.zeros(6, 2, 3, 2), stride=(2, 1),
                                     dilation=(1, 2), groups=2)
    assert f"output  {tuple(ref.shape)}" in out
    assert "H: floor((10 + 0 + 0 - 1*(3-1) - 1) / 2) + 1 = 4   (the last 1 input position(s) are never read)" in out
    rc, out, _ = _run(capsys, "conv1d", "--input", "1,1,10", "--out-channels", "1", "--kernel", "3", "--padding",
                      "same")
    assert "L: floor((10 + 1 + 1 - 1*(3-1) - 1) / 1) + 1 = 10" in out


@pytest.mark.parametrize("op,inp,w,kw", [
    ("conv_transpose2d", (1, 16, 16, 16), (16, 8, 4, 4), dict(stride=2, padding=1)),
    ("conv_transpose1d", (2, 3, 7), (3, 2, 3), dict(stride=3, padding=1, output_padding=2)),
    ("conv_transpose3d", (1, 2, 4, 4, 4), (2, 2, 4, 5, 6), dict(stride=(3, 2, 1), padding=(1, 2, 3),
                                                                 dilation=4, output_padding=(2, 3, 1))),
])
def test_transposed_matches_torch_and_prints_range(capsys, op, inp, w, kw):
    def flat(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    argv = [op, "--input", flat(inp), "--weight-shape", flat(w)]
    for k, v in kw.items():
        argv += ["--" + k.replace("_", "-"), flat(v)]
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    fn = getattr(torch.nn.functional, op)
    ref = fn(torch.zeros(inp), torch.zeros(w), **kw)
    assert f"output  {tuple(ref.shape)}" in out
    assert "valid output_size:" in out


def test_transposed_formula_and_output_size(capsys):
    rc, out, _ = _run(capsys, "conv_transpose2d", "--input", "1,16,16,16", "--weight-shape", "16,8,4,4",
                      "--stride", "2", "--padding", "1")
    assert "H: (16 - 1)*2 - 1 - 1 + 1*(4-1) + 1 + 0 = 32" in out
    assert "valid output_size: H 32..33, W 32..33" in out
    rc, out, _ = _run(capsys, "conv_transpose2d", "--input", "1,16,16,16", "--weight-shape", "16,8,4,4",
                      "--stride", "2", "--padding", "1", "--output-size", "33,32")
    assert rc == 0 and "output  (1, 8, 33, 32)" in out
    assert "H: (16 - 1)*2 - 1 - 1 + 1*(4-1) + 1 + 1 = 33" in out


@pytest.mark.parametrize("argv,msg", [
    (["conv2d", "--input", "1,3,4,4", "--out-channels", "2", "--kernel", "5"], "Kernel size can't be greater"),
    (["conv_transpose2d", "--input", "1,2,4,4", "--weight-shape", "2,1,3,3", "--stride", "2",
      "--output-size", "20"], "valid sizes range from [9, 9] to [10, 10]"),
    (["conv_transpose1d", "--input", "1,2,4", "--weight-shape", "2,1,3", "--stride", "2",
      "--output-padding", "2"], "output_padding must be smaller"),
    (["conv1d", "--input", "1,3,x", "--out-channels", "2", "--kernel", "3"], "'x' is not an integer"),
    (["conv1d", "--input", "1,4,10", "--out-channels", "4", "--kernel", "3", "--groups", "3"],
     "input channels (4) must be divisible by --groups 3"),
    (["conv2d", "--input", "1,3,8,8", "--out-channels", "2"], "give --weight-shape, or --out-channels and --kernel"),
    (["conv2d", "--input", "3,8", "--out-channels", "2", "--kernel", "3"], "needs N,C and 2 spatial sizes"),
    (["conv2d", "--input", "1,3,8,8", "--out-channels", "2", "--kernel", "3", "--stride", "1,2,3"],
     "--stride needs 1 or 2 values"),
    (["conv2d", "--input", "1,3,8,8", "--out-channels", "2", "--kernel", "3", "--stride", "0"],
     "stride must be positive"),
    (["conv2d", "--input", "1,3,8,8", "--weight-shape", "2,5,3,3"], "to have 5 channels, but got 3"),
    (["conv2d", "--input", "1,3,8,8", "--out-channels", "2", "--kernel", "3", "--output-padding", "1"],
     "transposed ops only"),
])
def test_errors_are_one_line(capsys, argv, msg):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1
