"""PyTorch STU-Net on one CUDA GPU, one case per process, as `stu bench --backend tch-cuda` times
ours: the recipe of shared/bench/gpu_anchor.py (cuDNN benchmark mode, autocast, GradScaler for
fp16, contiguous NCDHW).

  train_X: batch 2, 1 channel, 128^3, 105 classes, deep supervision (weights 8:4:2:1:0, outputs
           in f32), Dice (no background, smooth 1e-5) + CE, backward, global clip 12, SGD
           (lr 1e-2, momentum 0.99, Nesterov, wd 3e-5).
  infer_X: one 128^3 patch, batch 1, full-resolution head only, no grad.
  window_X_ct300[_tta], window_X_ct807: shared/bench/gpu_sliding_window.py's whole-volume sliding
           window (random volume at a CT's size at 1.5 mm, 128^3 tiles at step 0.5, Gaussian
           weights, fp32 sums on the device, argmax; all 8 mirrorings with _tta), its label map
           then copied to the host; after one warm-up window over a 128^3 volume, as there.

Usage: python torch_gpu.py SHARED_BENCH_DIR CASE DTYPE OUT.json [--profile TRACE.json] [--device cpu] [--patch N]
       [--volume D,H,W]
  (DTYPE: fp16, bf16 or fp32). Prints and writes {case, dtype, ms, samples_ms, peak_allocated_gib,
  peak_reserved_gib}. --profile runs one more step under torch.profiler and writes its Chrome
  trace (compare with `stu bench --profile` through profile_table.py); --device cpu is a dry run."""
import argparse
import json
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("bench_dir")
ap.add_argument("case")
ap.add_argument("dtype", choices=["fp16", "bf16", "fp32"])
ap.add_argument("out")
ap.add_argument("--profile")
ap.add_argument("--device", default="cuda")
ap.add_argument("--patch", type=int, default=128, help="cubic patch edge (as `stu bench --patch`)")
ap.add_argument("--volume", help="window cases: D,H,W instead of the case's (a dry run)")
A = ap.parse_args()
sys.path.insert(0, A.bench_dir)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch_ref import build  # noqa: E402
from timing import timed  # noqa: E402 (beside this script)

case, dtype_name, out = A.case, A.dtype, A.out
DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
torch.backends.cudnn.benchmark = True
dev = A.device
CUDA = dev == "cuda"
CLASSES = 105


def dc_ce(outs, target):
    ws = [1 / 2**i for i in range(len(outs))]
    ws[-1] = 0
    tot = sum(ws)
    loss = 0.0
    for i, (o, w) in enumerate(zip(outs, ws)):
        if w == 0:
            continue
        f = 2**i
        t = target[:, ::f, ::f, ::f]
        o = o.float()
        ce = F.cross_entropy(o, t)
        p = o.softmax(1)
        oh = F.one_hot(t, CLASSES).permute(0, 4, 1, 2, 3).float()
        inter = (p * oh).sum((2, 3, 4))
        den = p.sum((2, 3, 4)) + oh.sum((2, 3, 4))
        dice = ((2 * inter + 1e-5) / (den + 1e-5))[:, 1:].mean()
        loss = loss + w / tot * (ce - dice)
    return loss


def sync():
    if CUDA:
        torch.cuda.synchronize()


kind, size = case.split("_")[0], case.split("_")[1]
with torch.device(dev):  # initialise on the GPU (an H model on the CPU takes a while)
    m = build(size)
large = size in "LH"
auto = DT != torch.float32
if kind == "train":
    opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = torch.amp.GradScaler(dev, enabled=DT == torch.float16)
    P = A.patch
    x = torch.randn(2, 1, P, P, P, device=dev)
    y = torch.randint(0, CLASSES, (2, P, P, P), device=dev)

    def fn():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=DT, enabled=auto):
            outs = m(x)
        loss = dc_ce(outs, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(m.parameters(), 12)
        scaler.step(opt)
        scaler.update()
elif kind == "window":
    import math

    import numpy as np
    m.deep_supervision = False
    m.eval()
    P = A.patch
    shp = tuple(int(v) for v in A.volume.split(",")) if A.volume else {"ct300": (200, 273, 273), "ct807": (538, 273, 273)}[case.split("_")[2]]
    axes = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if case.endswith("_tta") else [()]

    def starts(n):  # gpu_sliding_window.py's
        k = max(1, math.ceil((n - P) / (P * 0.5)) + 1)
        return [0] if k == 1 else [int(round(i * (n - P) / (k - 1))) for i in range(k)]

    c = (np.arange(P) - (P - 1) / 2) / (P / 8)
    g1 = np.exp(-0.5 * c ** 2)
    g = g1[:, None, None] * g1[None, :, None] * g1[None, None, :]
    g = g / g.max()
    g[g == 0] = g[g > 0].min()
    g = torch.tensor(g, dtype=torch.float32, device=dev)

    @torch.no_grad()
    def window(vol):
        D, H, W = vol.shape[2:]
        acc = torch.zeros((CLASSES, D, H, W), device=dev)
        wsum = torch.zeros((D, H, W), device=dev)
        for z in starts(D):
            for y in starts(H):
                for x in starts(W):
                    t = vol[:, :, z:z + P, y:y + P, x:x + P]
                    with torch.autocast(dev, dtype=DT, enabled=auto):
                        out = sum((m(t.flip(a)).flip(a) if a else m(t)).float() for a in axes) / len(axes)
                    acc[:, z:z + P, y:y + P, x:x + P] += out[0] * g
                    wsum[z:z + P, y:y + P, x:x + P] += g
        return (acc / wsum).argmax(0).to(torch.int16).cpu()

    vol = torch.randn((1, 1) + shp, device=dev)
    window(vol[:, :, :P, :P, :P])  # warm-up (cuDNN's autotuning), as the anchor

    def fn():
        window(vol)
else:
    m.deep_supervision = False
    m.eval()
    x = torch.randn(1, 1, A.patch, A.patch, A.patch, device=dev)

    def fn():
        with torch.no_grad(), torch.autocast(dev, dtype=DT, enabled=auto):
            m(x).float()

if CUDA:
    torch.cuda.reset_peak_memory_stats()
if kind == "window":  # warmed up above; two whole volumes on a GPU, one on the CPU (as `stu bench`)
    ts = timed(fn, 0, 2 if CUDA else 1, CUDA)
else:
    ts = timed(fn, 2 if large else 3, 4 if large else 6, CUDA) if CUDA else timed(fn, 1, 2, CUDA)  # as `stu bench`
srt = sorted(ts)
r = {"case": case, "dtype": dtype_name, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
     "gpu": torch.cuda.get_device_name(0) if CUDA else "cpu", "ms": round(srt[len(srt) // 2], 2), "samples_ms": [round(t, 2) for t in ts]}
if CUDA:
    r["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    r["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
if A.profile:
    # One more step, after the timed ones (which it does not change), under the profiler.
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * CUDA
    with profile(activities=acts, record_shapes=True) as prof:
        fn()
        sync()
    prof.export_chrome_trace(A.profile)
print(json.dumps(r), flush=True)
json.dump(r, open(out, "w"))
