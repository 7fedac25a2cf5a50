"""`ndconv solve`: finds the known solutions, and every candidate really maps in -> out."""
import pytest
import torch

from ndconv.cli import main
from ndconv.tools.solve import solve


def _params(c):
    return (c.kernel, c.stride, c.padding, c.dilation, c.output_padding)


def test_conv_32_to_16():
    found = solve(32, 16)
    assert (3, 2, 1, 1, 0) in [_params(c) for c in found]
    assert _params(found[0]) == (2, 2, 0, 1, 0)  # simplest: no dilation, no gaps, smallest kernel
    for c in found:  # each verified independently with PyTorch
        y = torch.nn.functional.conv1d(torch.zeros(1, 1, 32), torch.zeros(1, 1, c.kernel), stride=c.stride,
                                       padding=c.padding, dilation=c.dilation)
        assert y.shape[-1] == 16


def test_transposed_16_to_32():
    found = solve(16, 32, transposed=True)
    assert (4, 2, 1, 1, 0) in [_params(c) for c in found]
    for c in found:
        y = torch.nn.functional.conv_transpose1d(torch.zeros(1, 1, 16), torch.zeros(1, 1, c.kernel),
                                                 stride=c.stride, padding=c.padding,
                                                 output_padding=c.output_padding, dilation=c.dilation)
        assert y.shape[-1] == 32


def test_order_and_gaps():
    found = solve(32, 16)
    keys = [c.sort_key() for c in found]
    assert keys == sorted(keys)
    k1 = [c for c in found if c.kernel == 1][0]
    assert k1.gaps == 16  # a 1-tap kernel at stride 2 skips every other input
    assert all(c.gaps == 0 for c in found if (c.kernel, c.dilation) == (3, 1))


def test_fixed_and_bounds():
    found = solve(28, 14, kernel=3)
    assert found and all(c.kernel == 3 for c in found)
    assert solve(10, 10, max_kernel=1, max_stride=1) == [] or all(c.kernel == 1 for c in solve(10, 10, max_kernel=1))
    assert all(c.stride <= 2 for c in solve(64, 20, max_stride=2))
    with pytest.raises(ValueError, match="in_size must be a positive int"):
        solve(0, 4)


def test_cli_table(capsys):
    assert main(["solve", "--input", "32", "--output", "16"]) == 0
    out = capsys.readouterr().out
    assert "     3      2       1        1   floor((32 + 1 + 1 - 1*(3-1) - 1) / 2) + 1 = 16" in out
    assert "simplest first" in out
    assert main(["solve", "--input", "16", "--output", "32", "--transposed", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "(16 - 1)*2 - 1 - 1 + 1*(4-1) + 1 + 0 = 32" in out and "more (raise --limit)" in out


@pytest.mark.parametrize("argv,msg", [
    (["--input", "16", "--output", "320"], "no conv maps 16 -> 320"),
    (["--input", "16", "--output", "x"], "'x' is not an integer"),
    (["--input", "16,16", "--output", "8"], "takes one positive integer"),
    (["--input", "0", "--output", "8"], "--input values must be >= 1"),
])
def test_cli_errors(capsys, argv, msg):
    rc = main(["solve"] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and msg in err
