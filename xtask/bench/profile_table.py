"""Per-op comparison of two profiler traces of the same step: ours (`stu bench --profile DIR`,
libtorch's Kineto profiler) and PyTorch's (`torch_gpu.py ... --profile PATH`, torch.profiler).
Both are Chrome traces of the same format.

On a GPU the time is the kernels' device time, each kernel attributed to the ATen op that launched
it (the innermost op open at the launch, Kineto's "External id"), and convolution kernels split by
their cuDNN name into forward, backward-data and backward-filter. Without kernels (a CPU run) it
is each op's self time (its time minus the ops it called).

  python3 profile_table.py OURS.json THEIRS.json [--out TABLE.md] [--json OUT.json] [--top N]

Prints (and writes) a table of time per category, ours vs PyTorch, with the ratio, then each
side's top ops. Traces may be gzipped (`.json.gz`)."""
import argparse
import collections
import gzip
import json

CATEGORIES = [
    # (category, predicate on the lower-case op name); the first that matches wins.
    ("convolution", lambda n: "conv" in n and "backward" not in n),
    ("convolution backward", lambda n: "conv" in n),
    ("instance/batch norm", lambda n: "norm" in n and "linalg" not in n and "norm_by" not in n and n not in ("aten::norm",)),
    ("LeakyReLU", lambda n: "leaky_relu" in n or n.startswith("aten::relu") or "threshold" in n),
    ("loss (softmax, logsumexp, gather, one-hot)", lambda n: any(k in n for k in ("softmax", "logsumexp", "gather", "one_hot", "nll", "scatter", "cross_entropy"))),
    ("upsampling", lambda n: "upsample" in n),
    ("optimizer (foreach / fused)", lambda n: "_foreach" in n or "fused_sgd" in n or "_amp_" in n),
    ("copy / cast / layout", lambda n: any(k in n for k in ("copy", "_to_copy", "clone", "contiguous", "cat", "stack", "pad", "repeat", "expand", "permute", "transpose"))),
    ("fill / zero", lambda n: any(k in n for k in ("fill", "zero", "ones", "full"))),
    ("reductions (sum, mean, norm, max)", lambda n: any(k in n for k in ("sum", "mean", "norm", "max", "min", "any", "all", "isfinite", "isinf", "isnan"))),
    ("elementwise arithmetic", lambda n: base(n) in ELEMENTWISE or base(n).startswith(("add", "mul", "sub", "div", "clamp", "pow", "exp", "log"))),
]
ELEMENTWISE = {"neg", "sqrt", "rsqrt", "where", "lerp", "eq", "ne", "lt", "gt", "le", "ge", "abs", "sign", "reciprocal", "maximum", "minimum"}


def base(n):
    """`aten::add_` → `add`."""
    return n.split("::")[-1].rstrip("_")


def category(op, kernel=None):
    n = (op or "").lower()
    k = (kernel or "").lower()
    if kernel is not None:
        # cuDNN / CUTLASS kernel names say which convolution pass they are.
        if "dgrad" in k:
            return "convolution backward (data)"
        if "wgrad" in k:
            return "convolution backward (filter)"
        if ("fprop" in k or "implicit_gemm" in k or "conv" in k) and "conv" in n:
            return "convolution backward (other kernels)" if "backward" in n else "convolution"
        if "nchwtonhwc" in k or "nhwctonchw" in k:
            return "convolution layout transform"
        if not n:
            return "kernels without an ATen op"
    for name, pred in CATEGORIES:
        if pred(n):
            if name == "convolution backward" and kernel is not None:
                return "convolution backward (other kernels)"
            return name
    return "other"


def load(path):
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt") as f:
        return json.load(f)["traceEvents"]


def summarise(path):
    ev = [e for e in load(path) if e.get("ph") == "X"]
    kernels = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    ops = [e for e in ev if e.get("cat") == "cpu_op"]
    by_cat = collections.defaultdict(lambda: [0.0, 0])
    by_op = collections.defaultdict(lambda: [0.0, 0])
    s = {"path": path}
    # The ATen op that launched each kernel: Kineto gives both the same "External id".
    launcher = {}
    for e in ops:
        i = e.get("args", {}).get("External id")
        if i is not None:
            launcher[i] = e

    def launched_by(kernel):
        return launcher.get(kernel.get("args", {}).get("External id"))

    if kernels:
        s["mode"] = "GPU kernel time"
        for e in kernels:
            op = (launched_by(e) or {}).get("name", "")
            if e["cat"] == "gpu_memcpy":
                c = "memcpy (host/device)" if "HtoD" in e["name"] or "DtoH" in e["name"] else "copy / cast / layout"
            elif e["cat"] == "gpu_memset":
                c = "fill / zero"
            else:
                c = category(op, e["name"])
            by_cat[c][0] += e["dur"]
            by_cat[c][1] += 1
            by_op[op or e["name"][:60]][0] += e["dur"]
            by_op[op or e["name"][:60]][1] += 1
        iv = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
        busy, end = 0.0, -1e300
        for a, b in iv:
            if b > end:
                busy += b - max(a, end)
                end = b
        t0 = min([e["ts"] for e in ops] + [iv[0][0]])
        t1 = max([e["ts"] + e["dur"] for e in ops] + [end])
        s["span_ms"] = (t1 - t0) / 1e3
        s["busy_ms"] = busy / 1e3
    else:
        s["mode"] = "CPU self time"
        # Self time: an op's duration minus that of the ops directly inside it (same thread).
        per_tid = collections.defaultdict(list)
        self_times = []
        for e in ops:
            per_tid[(e.get("pid"), e.get("tid"))].append(e)
        for evs in per_tid.values():
            evs.sort(key=lambda e: (e["ts"], -e["dur"]))
            stack = []
            selfs = {}
            for e in evs:
                while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                    stack.pop()
                selfs[id(e)] = e["dur"]
                if stack:
                    selfs[id(stack[-1])] -= e["dur"]
                stack.append(e)
            for e in evs:
                t = max(selfs[id(e)], 0.0)
                self_times.append((e, t))
                by_cat[category(e["name"])][0] += t
                by_cat[category(e["name"])][1] += 1
                by_op[e["name"]][0] += t
                by_op[e["name"]][1] += 1
        t0 = min(e["ts"] for e in ops)
        t1 = max(e["ts"] + e["dur"] for e in ops)
        s["span_ms"] = (t1 - t0) / 1e3
    # Phases by time: the forward until the first op named "*backward*" (the loss's own
    # gradient falls into it on our side, whose loss backward has no such op), the backward until
    # the last convolution backward ends, then clipping and the optimizer (training steps only).
    # (Without a convolution backward op, e.g. burn's generic convolutions, the last backward op.)
    bwd = [e for e in ops if "backward" in e["name"].lower()]
    if bwd:
        b0 = min(e["ts"] for e in bwd)
        conv_bwd = [e for e in bwd if "convolution_backward" in e["name"]] or bwd
        b1 = max(e["ts"] + e["dur"] for e in conv_bwd)
        phase = collections.defaultdict(float)

        def phase_of(ts):
            return "forward" if ts < b0 else "backward" if ts < b1 else "clip + optimizer"

        if kernels:
            for e in kernels:
                phase[phase_of((launched_by(e) or e)["ts"])] += e["dur"] / 1e3
        else:
            for e, t in self_times:
                phase[phase_of(e["ts"])] += t / 1e3
        s["phases"] = dict(phase)
        s["optimizer_ops"] = sum(1 for e in ops if e["ts"] >= b1)
    s["ops"] = len(ops)
    s["kernels"] = len(kernels)
    s["by_category"] = {k: {"ms": v[0] / 1e3, "n": v[1]} for k, v in by_cat.items()}
    s["by_op"] = {k: {"ms": v[0] / 1e3, "n": v[1]} for k, v in by_op.items()}
    s["total_ms"] = sum(v[0] for v in by_cat.values()) / 1e3
    return s


def table(a, b, top):
    md = [f"{a['mode']}, ms: ours `{a['path']}` vs PyTorch `{b['path']}`", ""]
    md += ["| category | ours | PyTorch | ratio | ours count | PyTorch count |", "|---|---|---|---|---|---|"]
    cats = sorted(set(a["by_category"]) | set(b["by_category"]), key=lambda c: -max(a["by_category"].get(c, {}).get("ms", 0), b["by_category"].get(c, {}).get("ms", 0)))
    z = {"ms": 0.0, "n": 0}
    for c in cats:
        x, y = a["by_category"].get(c, z), b["by_category"].get(c, z)
        ratio = f"{x['ms'] / y['ms']:.2f}×" if y["ms"] > 0 else "–"
        md.append(f"| {c} | {x['ms']:.2f} | {y['ms']:.2f} | {ratio} | {x['n']} | {y['n']} |")
    md.append(f"| **total** | **{a['total_ms']:.2f}** | **{b['total_ms']:.2f}** | **{a['total_ms'] / max(b['total_ms'], 1e-9):.2f}×** | {a['kernels'] or a['ops']} | {b['kernels'] or b['ops']} |")
    md.append("")
    line = f"Step span (first op to last {'kernel' if a['kernels'] else 'op'}): ours {a['span_ms']:.1f} ms, PyTorch {b['span_ms']:.1f} ms"
    if "busy_ms" in a and "busy_ms" in b:
        line += f"; GPU busy {a['busy_ms']:.1f} ({100 * a['busy_ms'] / a['span_ms']:.0f} %) vs {b['busy_ms']:.1f} ms ({100 * b['busy_ms'] / b['span_ms']:.0f} %)"
    md += [line + f"; ATen ops recorded: {a['ops']} vs {b['ops']}.", ""]
    if "phases" in a and "phases" in b:
        md += ["| phase | ours | PyTorch | ratio |", "|---|---|---|---|"]
        for ph in ("forward", "backward", "clip + optimizer"):
            x, y = a["phases"].get(ph, 0.0), b["phases"].get(ph, 0.0)
            md.append(f"| {ph} | {x:.2f} | {y:.2f} | {x / y:.2f}× |" if y > 0 else f"| {ph} | {x:.2f} | {y:.2f} | – |")
        md += ["", f"ATen ops after the backward (clip + optimizer): ours {a['optimizer_ops']}, PyTorch {b['optimizer_ops']}.", ""]
    for name, s in (("ours", a), ("PyTorch", b)):
        md += [f"Top {top} ops, {name}:", "", "| op | ms | count |", "|---|---|---|"]
        for k, v in sorted(s["by_op"].items(), key=lambda kv: -kv[1]["ms"])[:top]:
            md.append(f"| `{k}` | {v['ms']:.2f} | {v['n']} |")
        md.append("")
    return "\n".join(md)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("theirs")
    ap.add_argument("--out")
    ap.add_argument("--json")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    x, y = summarise(a.ours), summarise(a.theirs)
    md = table(x, y, a.top)
    print(md)
    if a.out:
        open(a.out, "w").write(md + "\n")
    if a.json:
        json.dump({"ours": x, "torch": y}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
