"""Weight gradients on the GPU with and without determinism, for ndconv and PyTorch.

PyTorch's default (``cudnn.deterministic = False``) lets cuDNN pick weight-gradient
engines that add partial sums with atomics; ndconv is deterministic by default.  This
prints, per suite case, the CUDA-event time (median of 15) of PyTorch's weight gradient
under both settings and of ndconv's ``cudnn_graph`` (forced) under both, so a bench row
near 1.0 can be read against either.

    python3 scripts/gpu_determinism.py [--cases a,b]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="t2d_unet_k2s2,c2d_resnet3x3,c3d_unet,c2d_resnet_s2")
    args = parser.parse_args()
    import cupy as cp
    import torch
    from ndconv import bench
    from ndconv.engine.gpu import GPUEngine
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    start, stop = cp.cuda.Event(), cp.cuda.Event()

    def event_ms(fn, repeat=15):
        fn()
        times = []
        for _ in range(repeat):
            cp.cuda.Device().synchronize()
            torch.cuda.synchronize()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop))
        return statistics.median(times)

    suite = bench.load_suite(bench.DEFAULT_SUITE)["gpu"]
    for case in bench.select_cases(suite, args.cases):
        g = case.geometry()
        x, w, gy = bench.make_inputs(case, "float32")
        cells = []
        for det in (False, True):
            torch.backends.cudnn.deterministic = det
            fn = bench.torch_calls(case, *(torch.as_tensor(a).cuda() for a in (x, w, gy)))["bwd_weight"]
            cells.append(f"torch det={det} {event_ms(fn):.3f}")
        a, b = (cp.asarray(gy), cp.asarray(x)) if case.transposed else (cp.asarray(x), cp.asarray(gy))
        for det in (True, False):
            eng = GPUEngine(algorithm="cudnn_graph", deterministic=det)
            cells.append(f"cudnn_graph det={det} {event_ms(lambda: eng.backward_weight(a, b, g)):.3f}")
        print(f"{case.name}: " + " | ".join(cells) + " (ms)", flush=True)


if __name__ == "__main__":
    main()
