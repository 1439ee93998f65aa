"""Milliseconds per call of a function on a CUDA device (CUDA events around each call) or the
CPU (wall clock), after warm-up calls: what the PyTorch-side GPU scripts share."""
import time

import torch


def timed(fn, warm, n, cuda):
    """`n` timed calls of `fn` after `warm` untimed ones; a list of milliseconds."""
    for _ in range(warm):
        fn()
    if cuda:
        torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return ts
