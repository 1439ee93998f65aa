"""PyTorch STU-Net on one CUDA GPU, one case per process, as `stu bench --backend tch-cuda` times
ours: the recipe of shared/bench/gpu_anchor.py (cuDNN benchmark mode, autocast, GradScaler for
fp16, contiguous NCDHW).

  train_X: batch 2, 1 channel, 128^3, 105 classes, deep supervision (weights 8:4:2:1:0, outputs
           in f32), Dice (no background, smooth 1e-5) + CE, backward, global clip 12, SGD
           (lr 1e-2, momentum 0.99, Nesterov, wd 3e-5).
  infer_X: one 128^3 patch, batch 1, full-resolution head only, no grad.

Usage: python torch_gpu.py SHARED_BENCH_DIR CASE DTYPE OUT.json   (DTYPE: fp16, bf16 or fp32)
Prints and writes {case, dtype, ms, samples_ms, peak_allocated_gib, peak_reserved_gib}."""
import json
import sys

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch_ref import build  # noqa: E402

case, dtype_name, out = sys.argv[2], sys.argv[3], sys.argv[4]
DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
torch.backends.cudnn.benchmark = True
dev = "cuda"
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


def timed(fn, warm, n):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return ts


kind, size = case.split("_")[0], case.split("_")[1]
with torch.device(dev):  # initialise on the GPU (an H model on the CPU takes a while)
    m = build(size)
large = size in "LH"
auto = DT != torch.float32
if kind == "train":
    opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = torch.amp.GradScaler(enabled=DT == torch.float16)
    x = torch.randn(2, 1, 128, 128, 128, device=dev)
    y = torch.randint(0, CLASSES, (2, 128, 128, 128), device=dev)

    def fn():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=DT, enabled=auto):
            outs = m(x)
        loss = dc_ce(outs, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(m.parameters(), 12)
        scaler.step(opt)
        scaler.update()
else:
    m.deep_supervision = False
    m.eval()
    x = torch.randn(1, 1, 128, 128, 128, device=dev)

    def fn():
        with torch.no_grad(), torch.autocast("cuda", dtype=DT, enabled=auto):
            m(x).float()

torch.cuda.reset_peak_memory_stats()
ts = timed(fn, 2 if large else 3, 4 if large else 6)  # as `stu bench` on a GPU
srt = sorted(ts)
r = {"case": case, "dtype": dtype_name, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
     "gpu": torch.cuda.get_device_name(0), "ms": round(srt[len(srt) // 2], 2), "samples_ms": [round(t, 2) for t in ts],
     "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
     "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
print(json.dumps(r), flush=True)
json.dump(r, open(out, "w"))
