"""STU-Net's 3³ convolutions, one shape at a time, through each convolution algorithm that our
libtorch path can pick, in PyTorch on one device: what a whole-network row cannot say is which
algorithm wins on which shape.

    python conv_algos.py --sizes BH --json OUT.json [--md OUT.md] [--device cuda] [--patch 128]
                         [--budget 90]

Per model (widths and blocks per stage as `stu zoo`), every distinct 3³ convolution of a 128³
patch (encoder, decoder, the stem, the strided downsampling ones) with how often the network
runs it, timed for inference (batch 1, no grad) and training (batch 2, forward + backward of
input and weight), in fp16 on CUDA (f32 on the CPU, for a dry run):

- `ncdhw`: `conv3d` on contiguous tensors (PyTorch's own STU-Net and our CUDA default until 2026-11-28);
- `ndhwc`: `conv3d` on `channels_last_3d` tensors (`STU_TCH_CHANNELS_LAST=1`);
- `d2`: the depth-split convolution of `stu_engine::torch` (`STU_TCH_CONV=d2` with
  channels-last): one 2-D convolution over the `[B·D, H, W, C]` view with the kernel's depth
  slices stacked as output channels, then a sum along depth. Depth-stride-1 convolutions only;
  the strided ones stay `ndhwc` there, as in ours.

Each algorithm gets its input, weight and (in training) output gradient already in its layout,
as in the network, where activations stay in one layout from stage to stage: the clock sees the
convolution and its backward, never a conversion (before 2026-11-29 the `ndhwc` and `d2` columns
also timed the input's conversion to channels-last, its gradient's conversion back and the
weight's: H's 192→96 convolution at 128³ read 55.8 ms for training against 31.2 NCDHW, while
the whole channels-last network's convolutions profiled at 50.5 ms for H's patch against
NCDHW's 49.8 + 16.1 ms of cuDNN's own layout transforms).
Each shape's algorithms are checked against `ncdhw` (relative max difference) before timing.
Totals are Σ count × median time: the convolutions' share of a forward (or a training
step's forward + backward), per algorithm, and with the best algorithm per shape. cuDNN runs in
benchmark mode, as in both sides' benches; CUDA events time each call.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

from timing import timed

ap = argparse.ArgumentParser()
ap.add_argument("--sizes", default="BH")
ap.add_argument("--patch", type=int, default=128)
ap.add_argument("--device", default="cuda")
ap.add_argument("--json", required=True)
ap.add_argument("--md")
ap.add_argument("--budget", type=float, default=90.0, help="seconds; later shapes are skipped past it")
ap.add_argument("--reps", type=int, default=5)
A = ap.parse_args()

MODELS = {  # blocks per stage, widths (stu zoo)
    "S": (1, [16, 32, 64, 128, 256, 256]),
    "B": (1, [32, 64, 128, 256, 512, 512]),
    "L": (2, [64, 128, 256, 512, 1024, 1024]),
    "H": (3, [96, 192, 384, 768, 1536, 1536]),
}
dev = torch.device(A.device)
cuda = dev.type == "cuda"
dt = torch.float16 if cuda else torch.float32
torch.backends.cudnn.benchmark = True
T0 = time.time()


def median(ts):
    return sorted(ts)[len(ts) // 2]




def shapes(blocks, widths, patch):
    """(c_in, c_out, input extent, stride, count) of every 3³ convolution."""
    out = {}

    def add(ci, co, r, s, n):
        out[(ci, co, r, s)] = out.get((ci, co, r, s), 0) + n

    for s, c in enumerate(widths):
        r = patch >> s
        if r < 1:  # (a patch too small for this many stages)
            break
        same = 1 + 2 * (blocks - 1)  # a stage's stride-1 C→C convolutions: conv2 of block 0, both of the rest
        if s == 0:
            add(1, c, r, 1, 1)
        else:
            add(widths[s - 1], c, 2 * r, 2, 1)
        add(c, c, r, 1, same)
        if s < len(widths) - 1:  # the decoder level at this resolution
            add(2 * c, c, r, 1, 1)
            add(c, c, r, 1, same)
    return [(k, n) for k, n in sorted(out.items(), key=lambda kv: -kv[0][2])]


def conv_d2(x, w, stride):
    n, c, d, h, wd = x.shape
    co, ci, kd, kh, kw = w.shape
    x2 = x.permute(0, 2, 3, 4, 1).reshape(n * d, h, wd, c).permute(0, 3, 1, 2)
    w2 = w.permute(2, 0, 3, 4, 1).contiguous().reshape(kd * co, kh, kw, ci).permute(0, 3, 1, 2)
    y = F.conv2d(x2, w2, None, stride[1:], (kh // 2, kw // 2))
    h2, w3 = y.shape[2], y.shape[3]
    y = y.permute(0, 2, 3, 1).contiguous().reshape(n, d, h2, w3, kd, co)
    mid = kd // 2
    out = y[:, :, :, :, mid].contiguous()
    for j in range(kd):
        off = j - mid
        ln = d - abs(off)
        if j != mid and ln > 0:
            t0 = max(-off, 0)
            out[:, t0:t0 + ln] += y[:, t0 + off:t0 + off + ln, :, :, j]
    return out.permute(0, 4, 1, 2, 3)


def laid(name, t):
    """`t` in the layout algorithm `name` reads (a copy; the network keeps activations so)."""
    return t.contiguous() if name == "ncdhw" else t.contiguous(memory_format=torch.channels_last_3d)


def algo(name, x, w, s):
    """Algorithm `name` on `x` and `w` already in its layout (`laid`)."""
    if name == "ncdhw" or name == "ndhwc" or s[0] != 1:
        return F.conv3d(x, w, None, s, 1)
    return conv_d2(x, w, s)


ALGOS = ["ncdhw", "ndhwc", "d2"]
R = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
     "cudnn": torch.backends.cudnn.version(), "dtype": str(dt), "patch": A.patch, "models": {}, "skipped": []}


def attempt(row, key, f):
    """`f()` (ms), or None with the error kept in the row: one failing algorithm (memory, an
    unsupported cuDNN case) leaves the others' timings."""
    try:
        return f()
    except Exception as e:  # noqa: BLE001
        row.setdefault("errors", {})[key] = repr(e)[:300]
        if cuda:
            torch.cuda.empty_cache()
        return None


def totals(rows):
    """Σ count × ms per mode and algorithm (None when a shape of it failed), and with the best
    algorithm per shape."""
    tot = {}
    for mode in ("infer_ms", "train_ms"):
        t = {}
        for a in ALGOS:
            v = [r["count"] * r[mode][a] for r in rows if r[mode].get(a) is not None]
            t[a] = round(sum(v), 2) if len(v) == len(rows) else None
        t["best per shape"] = round(sum(r["count"] * min(v for v in r[mode].values() if v is not None) for r in rows if any(v is not None for v in r[mode].values())), 2)
        tot[mode] = t
    return tot


def write():
    """Everything so far (a time-out keeps what was measured)."""
    R["wall_s"] = round(time.time() - T0, 1)
    json.dump(R, open(A.json, "w"), indent=1)
    if not A.md:
        return
    cell = lambda v: "–" if v is None else str(v)  # noqa: E731
    md = [f"{R['device']}, PyTorch {R['torch']}, cuDNN {R['cudnn']}, {R['dtype']}, {A.patch}³; ms, Σ count × median", ""]
    for size, m in R["models"].items():
        md += [f"### STU-Net-{size} ({m['gmac_3x3x3_per_sample']} GMAC of 3³ convolutions per sample{'' if m['complete'] else ', incomplete'})", "",
               "| shape (in→out @ extent /stride) × count | " + " | ".join(f"infer {a}" for a in ALGOS) + " | " + " | ".join(f"train {a}" for a in ALGOS) + " |",
               "|---|" + "---|" * (2 * len(ALGOS))]
        for r in m["rows"]:
            md.append(f"| {r['c_in']}→{r['c_out']} @ {r['extent']} /{r['stride']} × {r['count']} | " + " | ".join(cell(r["infer_ms"].get(a)) for a in ALGOS) + " | " + " | ".join(cell(r["train_ms"].get(a)) for a in ALGOS) + " |")
        for mode in ("infer_ms", "train_ms"):
            md.append(f"| **total {mode[:-3]}** | " + ", ".join(f"{a} {cell(v)}" for a, v in m["totals"][mode].items()) + " |" + " |" * (2 * len(ALGOS) - 1))
        md += [f"- {r['c_in']}→{r['c_out']} @ {r['extent']}: {k}: {e}" for r in m["rows"] for k, e in r.get("errors", {}).items()]
        md.append("")
    open(A.md, "w").write("\n".join(md) + "\n")


g = torch.Generator(device="cpu").manual_seed(0)
for size in A.sizes:
    blocks, widths = MODELS[size]
    todo = shapes(blocks, widths, A.patch)
    macs = sum(count * ci * co * 27 * (r // s) ** 3 for (ci, co, r, s), count in todo)
    rows = []
    R["models"][size] = m = {"rows": rows, "totals": {}, "gmac_3x3x3_per_sample": round(macs / 1e9, 1), "complete": False}
    for (ci, co, r, s), count in todo:
        if time.time() - T0 > A.budget:
            R["skipped"].append([size, ci, co, r, s])
            continue
        stride = (s, s, s)
        w = (torch.randn(co, ci, 3, 3, 3, generator=g) / (ci * 27) ** 0.5).to(dev, dt)
        row = {"c_in": ci, "c_out": co, "extent": r, "stride": s, "count": count, "infer_ms": {}, "train_ms": {}, "rel_err": {}}
        x1 = torch.randn(1, ci, r, r, r, generator=g).to(dev, dt)
        with torch.no_grad():
            ref = algo("ncdhw", x1, w, stride).float()
            for a in ALGOS:
                def infer():
                    xa, wa = laid(a, x1), laid(a, w)
                    got = algo(a, xa, wa, stride).float()
                    row["rel_err"][a] = float((got - ref).abs().max() / ref.abs().max())
                    del got
                    return round(median(timed(lambda: algo(a, xa, wa, stride), 2, A.reps, cuda)), 4)
                row["infer_ms"][a] = attempt(row, f"infer {a}", infer)
        del x1, ref
        x2 = torch.randn(2, ci, r, r, r, generator=g).to(dev, dt)
        for a in ALGOS:
            def train():
                # Leaves in the algorithm's layout, and an output gradient in the layout its
                # output comes in: the backward converts nothing either.
                xa, wa = laid(a, x2).requires_grad_(), laid(a, w).requires_grad_()
                with torch.no_grad():
                    gy = torch.ones_like(algo(a, xa, wa, stride))

                def step():
                    algo(a, xa, wa, stride).backward(gy)
                    xa.grad = wa.grad = None
                return round(median(timed(step, 2, A.reps, cuda)), 4)
            row["train_ms"][a] = attempt(row, f"train {a}", train)
        del x2
        if cuda:
            torch.cuda.empty_cache()
        rows.append(row)
        m["totals"], m["complete"] = totals(rows), len(rows) == len(todo)
        print(json.dumps({"model": size, **row}), flush=True)
        write()
    print(json.dumps({"model": size, "totals": m["totals"]}), flush=True)
write()
