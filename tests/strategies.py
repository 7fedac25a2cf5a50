"""Hypothesis strategies and helpers shared by the engine tests."""
from hypothesis import strategies as st


@st.composite
def conv_cases(draw, per_group=st.integers(1, 3), size_slack=4):
    """A convolution geometry: 1-3-D, kernel 1-3, stride 1-2, dilation 1-2, asymmetric
    padding 0-2, 1-3 groups of ``per_group`` channels in and out, sizes that fit the window."""
    nd = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)))
    stride = tuple(draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd)))
    dilation = tuple(draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd)))
    lo = tuple(draw(st.lists(st.integers(0, 2), min_size=nd, max_size=nd)))
    hi = tuple(draw(st.lists(st.integers(0, 2), min_size=nd, max_size=nd)))
    size = tuple(draw(st.integers(s * (d * (k - 1) + 1), s * (d * (k - 1) + 1) + size_slack))
                 for k, s, d in zip(kernel, stride, dilation))
    return dict(batch=draw(st.integers(1, 3)), c_in=groups * draw(per_group),
                c_out=groups * draw(per_group), groups=groups, kernel=kernel, stride=stride,
                dilation=dilation, padding=tuple(zip(lo, hi)), size=size)


def at_thread_counts(fn, counts=(1, 2)):
    """``[fn() for each numba thread count]`` (capped by NUMBA_NUM_THREADS); the count is
    restored afterwards."""
    import numba
    saved = numba.get_num_threads()
    try:
        out = []
        for threads in counts:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            out.append(fn())
        return out
    finally:
        numba.set_num_threads(saved)
