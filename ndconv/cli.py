"""The ``ndconv`` command: subcommands are loaded lazily from their own modules.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""
import argparse
import importlib
import math
import sys

SUBCOMMANDS = {
    "demo": ("ndconv.demo", "train a convolutional autoencoder end to end (the main job)"),
    "bench": ("ndconv.bench", "time ndconv against PyTorch on the benchmark suite"),
    "shape": ("ndconv.tools.shape", "output shape of a convolution, with each formula filled in"),
    "solve": ("ndconv.tools.solve", "every (kernel, stride, padding, ...) mapping one size to another"),
    "explain": ("ndconv.tools.explain", "draw what a (transposed) convolution computes"),
}


def seconds_below(limit):
    """An argparse type: a number of seconds in [0, limit)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 <= value < limit:
            raise argparse.ArgumentTypeError(f"expected seconds in [0, {limit}), got {text!r}")
        return value
    return parse


def int_at_least(minimum):
    """An argparse type: an int >= minimum, with a one-line message otherwise."""
    what = "a positive integer" if minimum == 1 else "a non-negative integer" if minimum == 0 \
        else f"an integer >= {minimum}"

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ndconv", description="N-dimensional convolution tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else list(argv)
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    modules = {}
    for name, (module, helptext) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        if name == wanted:  # import only the subcommand that runs
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
