"""Cases `../shared/bench/cpu_anchor.py` does not time, measured the same way (2 threads, float32,
median; forward+backward back-propagates mean(output.0) of the deep-supervision forward).
Usage: python torch_extra.py SHARED_BENCH_DIR OUT.json"""
import json
import sys
import time

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402
from torch_ref import build  # noqa: E402

torch.set_num_threads(2)


def med(fn, n):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return round(ts[len(ts) // 2], 3)


torch.manual_seed(0)
m = build("B")
m.deep_supervision = True
x = torch.randn(1, 1, 128, 128, 128)


def fb():
    m.zero_grad(set_to_none=True)
    m(x)[0].float().mean().backward()


def fwd():
    with torch.no_grad():
        m(x)


R = {"B_128": {"fwd_s": med(fwd, 1), "fwd_bwd_s": med(fb, 2)}}
print(R, flush=True)
json.dump(R, open(sys.argv[2], "w"), indent=1)
