"""The GPU check, one call on a CUDA machine: parity of `stu` on the tch-cuda backend against the
shared PyTorch fixture (f32, bf16, f16), sliding-window prediction on real volumes, and the
training-step / patch-inference benchmark of STU-Net S/B/L/H next to PyTorch on the same card.

Every benchmark case runs in its own process (ours: `stu bench --backend tch-cuda CASE`; PyTorch:
`torch_gpu.py`), so the peak device memory NVML reports while it runs (minus the memory in use
before it started) is that case's alone, CUDA context included, measured the same way for both.

Usage:
  python3 gpu_suite.py --stu BIN --bench-dir SHARED_BENCH --fixture tiny_iso.safetensors
                       --mr MR_IMAGES_DIR --ct CT_IMAGES_DIR --out DIR [--sizes HLBS] [--budget S]
Before the benchmark, `stu check-ops` compares the fused ATen paths with burn's composed
operators on the device (values and gradients); last in phase 2, `conv_algos.py` times STU-Net's
3³ convolutions shape by shape through each convolution algorithm (DIR/conv_algos.md). With
`--stu-cuda` (a `cuda` build: burn's own CubeCL kernels), phase 2 also checks its parity and times
B's patch and training step with it. Binaries may come xz-compressed (`X.xz`: unpacked to /tmp).
Writes DIR/suite.json (everything), DIR/suite.md (tables), DIR/log.txt, the predicted label
maps DIR/mr_{f32,bf16}.nii.gz (to compare with a CPU run of the same command), and for H's and
B's training step and B's patch inference per-op tables of both sides' profiler traces
(DIR/profiles.md, `profile_table.py`; the summaries in suite.json) with the traces in one
archive (DIR/traces_phase{1,2,all}.tar.gz): the device tool brings back at most 8 files."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ap = argparse.ArgumentParser()
ap.add_argument("--stu", required=True)
ap.add_argument("--bench-dir", required=True)
ap.add_argument("--fixture", required=True)
ap.add_argument("--mr", required=True)
ap.add_argument("--ct", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--sizes", default="HLBS")
ap.add_argument("--torch-sizes", default=None, help="sizes timed on the PyTorch side (default: --sizes)")
ap.add_argument("--budget", type=float, default=480.0, help="seconds; later cases are skipped past it")
ap.add_argument("--python", default=sys.executable)
ap.add_argument("--train-data", default=None, help="a small preprocessed folder for the training check")
ap.add_argument("--phase", default="all", choices=["1", "2", "all"], help="1: the goal's rows and profiles; 2: the rest (a second call on the same machine)")
ap.add_argument("--backend", default="tch-cuda", help="`tch` runs the parity and MR steps on the CPU (a dry run of this script)")
ap.add_argument("--stu-cuda", default=None, help="a `stu` built with the `cuda` feature (burn's CubeCL CUDA backend; xtask/llvm.py): parity and B's rows in phase 2")
ap.add_argument("--cuda-include", default=None, help="CUDA's headers (a tar.xz holding include/), for CubeCL's run-time compiler where the machine has no /usr/local/cuda")
A = ap.parse_args()
os.makedirs(A.out, exist_ok=True)
T0 = time.time()
LOG = open(os.path.join(A.out, "log.txt"), "a")
R = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "parity": {}, "predict": {}, "bench": [], "skipped": []}


def unpacked(path):
    """`path`, or for `X.xz` its decompressed copy in /tmp (executable): the device tool carries
    at most 64 MiB, and the binaries are about a fifth of their size compressed."""
    if not path or not path.endswith(".xz"):
        return path
    import lzma
    dest = os.path.join("/tmp", os.path.basename(path)[:-3])
    with lzma.open(path) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(dest, 0o755)
    return dest


A.stu, A.stu_cuda = unpacked(A.stu), unpacked(A.stu_cuda)
if A.cuda_include and not os.environ.get("CUDA_PATH") and not os.path.exists("/usr/local/cuda"):
    with tarfile.open(A.cuda_include) as t:
        t.extractall("/tmp/cuda")
    os.environ["CUDA_PATH"] = "/tmp/cuda"


def log(*a):
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


STATE = "/tmp/gpu_suite_state.json"  # survives between two calls on one warm machine
if A.phase == "2" and os.path.exists(STATE):
    # The second call: phase 1's results come along into this call's tables, and the rows it
    # skipped for time run first.
    R = json.load(open(STATE))
    R["phase1_skipped"], R["skipped"] = R.get("skipped", []), []
    R["phase2_started"] = R.pop("started_phase2", time.strftime("%Y-%m-%d %H:%M:%S"))


def save():
    R["elapsed_s"] = round(time.time() - T0, 1)
    for path in (os.path.join(A.out, "suite.json"), STATE):
        with open(path, "w") as f:
            json.dump(R, f, indent=1)


class Peak:
    """Peak of the GPU's used memory (NVML, else nvidia-smi) while a case runs."""

    def __init__(self):
        self.h = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nv = pynvml
            self.h = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as e:  # noqa: BLE001
            log("NVML unavailable, polling nvidia-smi:", e)

    def used(self):
        if self.h is not None:
            return self.nv.nvmlDeviceGetMemoryInfo(self.h).used
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
            return int(out.split()[0]) * 2**20
        except Exception:  # noqa: BLE001  (no GPU: a dry run)
            return 0

    def run(self, cmd, timeout, env=None):
        base = self.used()
        peak = [base]
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], self.used())
                time.sleep(0.01)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        t = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = "timeout", ((e.stdout or b"") + (e.stderr or b"")).decode(errors="replace") if isinstance(e.stdout, bytes) else str(e)
        stop.set()
        th.join()
        return rc, out, round((peak[0] - base) / 2**30, 2), round(time.time() - t, 1)


PEAK = Peak()


def sh(cmd, timeout=120, env=None):
    log("$", " ".join(cmd))
    rc, out, peak, wall = PEAK.run(cmd, timeout, env)
    tail = out[-1500:]
    log(f"rc={rc} wall={wall}s peak={peak}GiB\n{tail}")
    return rc, out, peak, wall


# 0. The machine.
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except FileNotFoundError:
    smi = "(no nvidia-smi)"
R["gpu"] = smi
try:
    import torch
    R["torch"] = torch.__version__
    R["cudnn"] = torch.backends.cudnn.version()
except Exception as e:  # noqa: BLE001
    R["torch"] = repr(e)
log("gpu:", smi, "torch:", R.get("torch"), "cudnn:", R.get("cudnn"))
save()

# 1. Parity against the PyTorch fixture.
def parity(stu, backend, precs, into, timeout=120):
    """`stu forward` of the fixture on `backend` in each precision against PyTorch's outputs,
    into `into[prec]`; stops at the first failure."""
    try:
        from safetensors.numpy import load_file
        ref = load_file(A.fixture)
        for prec in precs:
            o = os.path.join(A.out, f"parity_{prec}.safetensors")
            rc, out, _, wall = sh([stu, "forward", "--checkpoint", A.fixture, "--input", A.fixture, "--output", o, "--backend", backend, "--precision", prec], timeout=timeout)
            if rc != 0:
                into[prec] = {"error": out[-800:]}
                return False
            got = load_file(o)
            rows = {}
            for k in sorted(x for x in ref if x.startswith("output.")):
                a, b = ref[k].astype("float64"), got[k].astype("float64")
                rows[k] = {"max_abs": float(abs(a - b).max()), "ref_max_abs": float(abs(a).max()), "rel": float(abs(a - b).max() / abs(a).max())}
            into[prec] = {"wall_s": wall, "outputs": rows, "worst_rel": max(r["rel"] for r in rows.values())}
            os.remove(o)
            log("parity", backend, prec, "worst max|diff|/max|ref| =", into[prec]["worst_rel"])
    except Exception as e:  # noqa: BLE001
        into["error"] = repr(e)
        return False
    return True


if A.phase != "2":
    parity(A.stu, A.backend, ["f32", "bf16", "f16"], R["parity"])
save()

# 1b. The fused ATen paths against burn's composed operators on this device (`stu check-ops`):
#     values and gradients of a residual block in each layout and norm kernel, and the split
#     norm in f32, bf16 and f16 (its CUDA kernels have no CPU counterpart to test them on).
if A.phase != "2":
    rc, out, _, wall = sh([A.stu, "check-ops", "--backend", A.backend], timeout=120)
    R["check_ops"] = {"rc": rc, "wall_s": wall, "tail": out[-1500:]}
    log("check-ops", rc, out.strip().splitlines()[-1] if out.strip() else "")
    save()

# 1c. STU-Net's 3³ convolutions one shape at a time through each algorithm our libtorch path can
#     pick (NCDHW, channels-last, depth-split 2-D), in PyTorch on this card (`conv_algos.py`):
#     which wins on which shape, for the layout and `STU_TCH_CONV` defaults. Last in phase 2
#     (2026-11-28's run answered it: NCDHW per shape, `reports/bench/gpu.md`).
def conv_algos():
    if A.backend != "tch-cuda":
        return
    j, m = "/tmp/conv_algos.json", os.path.join(A.out, "conv_algos.md")
    sizes = "".join(x for x in "BHL" if x in A.sizes)
    rc, out, _, wall = sh([A.python, os.path.join(HERE, "conv_algos.py"), "--sizes", sizes, "--json", j, "--md", m, "--budget", "70"], timeout=150)
    R["conv_algos"] = json.load(open(j)) if rc == 0 and os.path.exists(j) else {"rc": rc, "tail": out[-800:]}
    for size, v in R["conv_algos"].get("models", {}).items():
        log("conv_algos", size, json.dumps(v["totals"]))
    save()


# 3. Benchmark: per size, training step then patch inference; PyTorch fp16 (the anchor's
#    recipe) and ours bf16 and f16 (loss-scaled for training). What the goal is about runs
#    first (B, H, L), right after parity; the checks of section 2 and the extras (PyTorch bf16,
#    S, burn's generic operators) follow while the budget lasts.
def ours(case, prec, env_extra=None, timeout=180, stu=None, backend="tch-cuda"):
    j = f"/tmp/ours_{case}_{prec}.json"
    env = dict(os.environ, **(env_extra or {}))
    rc, out, peak, wall = sh([stu or A.stu, "bench", "--backend", backend, "--precision", prec, case, "--json", j], timeout=timeout, env=env)
    row = {"side": "stu", "case": case, "dtype": prec, "rc": rc, "peak_gib_nvml": peak, "wall_s": wall}
    if env_extra:
        row["env"] = env_extra
    if rc == 0:
        r = json.load(open(j))["results"][0]
        s = r.get("train_s") or r.get("fwd_s")
        row["ms"] = round(s * 1e3, 2)
        row["samples_ms"] = [round(x * 1e3, 2) for x in (r.get("train_samples") or r.get("fwd_samples"))]
    else:
        row["error"] = out[-600:]
    return row


def theirs(case, dt, timeout=180):
    j = f"/tmp/torch_{case}_{dt}.json"
    rc, out, peak, wall = sh([A.python, os.path.join(HERE, "torch_gpu.py"), A.bench_dir, case, dt, j], timeout=timeout)
    row = {"side": "torch", "case": case, "dtype": dt, "rc": rc, "peak_gib_nvml": peak, "wall_s": wall}
    if rc == 0:
        row.update({k: v for k, v in json.load(open(j)).items() if k in ("ms", "samples_ms", "peak_allocated_gib", "peak_reserved_gib")})
    else:
        row["error"] = out[-600:]
    return row



TRACES = []  # (path, name in the archive): written as one traces.tar.gz (the tool returns 8 files)


def profile_pair(case, dt, variant=None):
    """One more step of `case` under each side's profiler (ours `dt`, with `variant`'s
    environment if given; PyTorch the matching autocast dtype, traced once per case and dtype),
    and the per-op table of the two traces (`profile_table.py`), appended to profiles.md."""
    td = {"f16": "fp16", "bf16": "bf16", "f32": "fp32"}[dt]
    tag = f"{case}_{dt}" + (f"_{variant}" if variant else "")
    ours_dir, theirs = f"/tmp/prof_ours_{tag}", f"/tmp/prof_torch_{case}_{td}.json"
    shutil.rmtree(ours_dir, ignore_errors=True)
    row = {"side": "profile", "case": case, "dtype": dt}
    if variant:
        row["variant"] = variant
    env = dict(os.environ, **VARIANTS[variant][0]) if variant else None
    dev = "cuda" if A.backend == "tch-cuda" else "cpu"  # (a dry run on the CPU: `--backend tch`)
    rc1, out1, _, _ = sh([A.stu, "bench", "--backend", A.backend, "--precision", dt, case, "--profile", ours_dir], timeout=180, env=env)
    rc2, out2 = 0, ""
    if not os.path.exists(theirs):
        rc2, out2, _, _ = sh([A.python, os.path.join(HERE, "torch_gpu.py"), A.bench_dir, case, td, f"/tmp/torch_prof_{case}.json", "--profile", theirs, "--device", dev], timeout=180)
    ours_trace = os.path.join(ours_dir, f"{case}.json")
    if rc1 != 0 or rc2 != 0 or not os.path.exists(ours_trace) or not os.path.exists(theirs):
        row["error"] = (out1[-300:] if rc1 != 0 else "") + (out2[-300:] if rc2 != 0 else "")
        return row
    md, js = f"/tmp/profile_{tag}.md", f"/tmp/profile_{tag}.json"
    rc, out, _, _ = sh([A.python, os.path.join(HERE, "profile_table.py"), ours_trace, theirs, "--out", md, "--json", js], timeout=120)
    row["rc"] = rc
    if rc == 0:
        row["table"] = f"profiles.md#{tag}"
        summary = json.load(open(js))
        row["summary"] = summary
        row["ours_total_ms"] = round(summary["ours"]["total_ms"], 2)
        row["torch_total_ms"] = round(summary["torch"]["total_ms"], 2)
        with open(os.path.join(A.out, "profiles.md"), "a") as f:
            f.write(f"\n## {tag}\n\n" + open(md).read())
    # The raw traces, for Perfetto or a later look.
    TRACES.append((ours_trace, f"{tag}_ours.json"))
    if (theirs, f"{case}_{td}_torch.json") not in TRACES:
        TRACES.append((theirs, f"{case}_{td}_torch.json"))
    return row


def train_check(prec, variant=None):
    """`stu train` on the phantom subset in `prec` (section 2b), with `variant`'s environment."""
    key = prec + (f"+{variant}" if variant else "")
    o = f"/tmp/train_{key}"
    shutil.rmtree(o, ignore_errors=True)  # a rerun on the same machine starts afresh
    env = dict(os.environ, **VARIANTS[variant][0]) if variant else None
    rc, out, peak, wall = sh([A.stu, "train", A.train_data, "--out", o, "--base-width", "8", "--patch-size", "64,64,64", "--batch-size", "2",
                              "--epochs", "3", "--iterations", "10", "--val-iterations", "2", "--backend", A.backend, "--precision", prec], timeout=150, env=env)
    logs = []
    if os.path.exists(f"{o}/log.jsonl"):
        logs = [json.loads(line) for line in open(f"{o}/log.jsonl")]
    R.setdefault("train_check", {})[key] = {"rc": rc, "wall_s": wall, "peak_gib": peak, "epochs": [{k: e.get(k) for k in ("train_losses", "val_loss", "iterations_per_second", "epoch_seconds", "data_wait_seconds", "skipped_steps")} for e in logs], "tail": out[-300:]}
    save()


# Our side with an environment that switches one path off, and the seconds it may take.
# The top level's channel-changing 3³ convolutions of every size (each pattern matches only its
# own size's): `STU_TCH_CONV_NCDHW`, for the `stu-ncdhw-top` and `stu-top-zero` rows.
TOP = "32x16@128,16x32@128,64x32@128,32x64@128,128x64@128,64x128@128,192x96@128,96x192@128"
VARIANTS = {
    # Channels-last is the default on every device since the H200 run of 2026-11-28 (faster
    # than NCDHW in every case timed both ways); NCDHW beside it, with its CUDA default norm
    # (rows split into chunks, `STU_TCH_NORM=split`, faster than ATen's plane-per-block norm in
    # every NCDHW case that day) and, for B, with the unsplit norm.
    "stu-nc": ({"STU_TCH_CHANNELS_LAST": "0"}, 150),
    "stu-nc-plane": ({"STU_TCH_CHANNELS_LAST": "0", "STU_TCH_NORM": "plane"}, 150),
    "stu-noloss": ({"STU_TCH_NATIVE": "conv,norm,upsample,sgd"}, 75),
    "stu-nosgd": ({"STU_TCH_NATIVE": "conv,norm,loss,upsample"}, 120),
    "stu-generic": ({"STU_TCH_NATIVE": "0"}, 75),
    # Inference through a CUDA graph (`stu_engine::graph`): captured at the second patch,
    # replayed after. Off by default until measured here (on 2026-11-28 every graph row fell
    # back to eager: the bench's freshly built network was tracked by autodiff, since fixed).
    "stu-graph": ({"STU_TCH_GRAPH": "1"}, 120),
    "stu-nc-graph": ({"STU_TCH_GRAPH": "1", "STU_TCH_CHANNELS_LAST": "0"}, 120),
    # Channels-last with the depth-split convolutions (`STU_TCH_CONV=d2`); slower than the
    # default in every case of 2026-11-28 (B, H, L), kept among the extras.
    "stu-d2": ({"STU_TCH_CONV": "d2"}, 150),
    # The channels-last path's three switchable changes since the second H200 run of 2026-11-28
    # turned back: ATen's `upsample_nearest3d` kernels (NCDHW only on CUDA: layout conversions
    # around them and an NCDHW gradient), per-sample norm outputs concatenated, and half weights
    # cast NCDHW (each convolution converting its weight again). The defaults (a broadcast copy
    # in the activations' layout; the norm writing each sample into its slice; the cast writing
    # channels-last) are not yet timed on a GPU: this row beside the default says what they
    # gain. (The loss on half logits, the convolution keeping only its weight's channels-last
    # copy and the strided shortcut's single view have no switch: compare the default with that
    # run's `stu` rows.)
    "stu-before": ({"STU_TCH_UPSAMPLE": "aten", "STU_TCH_NORM_CL": "cat", "STU_TCH_WEIGHT_CL": "0"}, 150),
    # Channels-last, but the two 3³ convolutions of the top level whose channels change (the
    # decoder's first, on the concatenation, and the first downsampling) through cuDNN's NCDHW
    # kernels, copies in and out (`STU_TCH_CONV_NCDHW`): one shape at a time (2026-11-28) H's
    # 192→96 at 128³ took 4.7 ms NCDHW against 10.2 channels-last (a patch) and 31.2 against
    # 55.8 (training), 96→192 /2 6.6 against 14.0, more than the copies should cost (`TOP`).
    "stu-ncdhw-top": ({"STU_TCH_CONV_NCDHW": TOP}, 150),
    # A bias left out of its convolution (a norm follows) given a zero gradient instead of the
    # output gradient's sum, zero but for rounding (`STU_TCH_BIAS_GRAD=zero`): one read of every
    # such convolution's output gradient less, ~12 GB for H's step. Then both together.
    "stu-zero-bias-grad": ({"STU_TCH_BIAS_GRAD": "zero"}, 150),
    "stu-top-zero": ({"STU_TCH_CONV_NCDHW": TOP, "STU_TCH_BIAS_GRAD": "zero"}, 150),
}


def run_plan(plan):
    for side, case, dt in plan:
        if time.time() - T0 > A.budget:
            R["skipped"].append([side, getattr(case, "__name__", case), dt])
            continue
        if side == "call":
            case()
            continue
        if side.startswith("train_check"):
            if A.train_data:
                train_check(dt, side.partition(":")[2] or None)
            continue
        if side.startswith("profile"):
            row = profile_pair(case, dt, side.partition(":")[2] or None)
            R.setdefault("profiles", []).append(row)
            log("profile", json.dumps(row))
            save()
            continue
        if side == "torch":
            row = theirs(case, dt)
        elif side == "stu":
            row = ours(case, dt)
        else:
            env, timeout = VARIANTS[side]
            row = ours(case, dt, env, timeout=timeout)
            row["side"] = side
        R["bench"].append(row)
        log("bench", json.dumps({k: v for k, v in row.items() if k not in ("samples_ms", "error")}))
        save()


def over_budget(what):
    if time.time() - T0 > A.budget:
        R["skipped"].append(what)
        return True
    return False


# 2. Sliding-window prediction: the tiny fixture model on the MR case (labels come back to be
#    compared with a CPU run), and STU-Net-B (PyTorch init, 105 classes) on a CT case.
def predict_mr():
    for prec in ["f32", "bf16"]:
        if over_budget(["predict", "tiny_mr", prec]):
            continue
        o = f"/tmp/stu_pred_mr_{prec}"
        shutil.rmtree(o, ignore_errors=True)  # a rerun on the same machine starts afresh
        rc, out, peak, wall = sh([A.stu, "predict", "-i", A.mr, "-o", o, "--checkpoint", A.fixture, "--backend", A.backend, "--precision", prec], timeout=120)
        R["predict"][f"tiny_mr_{prec}"] = {"rc": rc, "wall_s": wall, "peak_gib": peak}
        for f in os.listdir(o) if os.path.isdir(o) else []:
            if f.endswith(".nii.gz"):
                shutil.copy(os.path.join(o, f), os.path.join(A.out, f"mr_{prec}.nii.gz"))
    save()


def label_agreement(a, b):
    """The fraction of voxels two NIfTI-1 label maps of one geometry agree on."""
    import gzip
    import numpy as np

    def voxels(path):
        raw = gzip.open(path).read()
        code = int(np.frombuffer(raw[70:72], "<i2")[0])
        offset = int(np.frombuffer(raw[108:112], "<f4")[0])
        dtype = {2: "u1", 4: "<i2", 8: "<i4", 16: "<f4", 256: "i1", 512: "<u2", 768: "<u4"}[code]
        return np.frombuffer(raw[offset:], dtype)

    x, y = voxels(a), voxels(b)
    return float((x == y).mean()) if x.shape == y.shape else None


def predict_ct():
    try:
        if A.backend != "tch-cuda":
            raise RuntimeError("B on CT: GPU only")
        if over_budget(["predict", "B_ct", "bf16"]):
            raise RuntimeError("B on CT: over budget")
        sys.path.insert(0, A.bench_dir)
        import torch
        from safetensors.torch import save_file
        from torch_ref import build
        torch.manual_seed(0)
        b_ckpt = "/tmp/stunet_b_init.safetensors"
        save_file({k: v.contiguous() for k, v in build("B").state_dict().items()}, b_ckpt)
        # bf16 eagerly, then through a CUDA graph (the same label map is expected: the same
        # kernels replayed), then eagerly with the tiles summed in host memory (what a case
        # too large for the device's free memory gets; the same map again, to f32 rounding).
        # Last, with cuDNN's heuristics instead of its benchmark mode (its timing of each shape's
        # first call is part of a single case's time to the first tile).
        for prec, env in [("bf16", None), ("bf16_graph", {"STU_TCH_GRAPH": "1"}), ("bf16_host", {"STU_ACCUMULATE": "host"}), ("bf16_nobench", {"STU_CUDNN_BENCHMARK": "0"})]:
            o = f"/tmp/pred_ct_{prec}"
            shutil.rmtree(o, ignore_errors=True)  # a rerun on the same machine starts afresh
            rc, out, peak, wall = sh([A.stu, "predict", "-i", A.ct, "-o", o, "--checkpoint", b_ckpt, "--backend", "tch-cuda", "--precision", "bf16", "--disable-tta"],
                                     timeout=180, env=dict(os.environ, **env) if env else None)
            # (The tail's timing line splits the network's time: to the first tile, the warm-up,
            # and waiting for the export stage.)
            R["predict"][f"B_ct_{prec}"] = {"rc": rc, "wall_s": wall, "peak_gib": peak, "tail": out[-600:]}
            save()
        # The fraction of voxels whose labels agree (an untrained network's 105 logits are
        # near ties in much of the volume, so one ulp of summation order flips some of them).
        a = "/tmp/pred_ct_bf16"
        for key, b in [("B_ct_graph_agrees_with_eager", "/tmp/pred_ct_bf16_graph"), ("B_ct_host_sum_agrees_with_device_sum", "/tmp/pred_ct_bf16_host")]:
            if os.path.isdir(a) and os.path.isdir(b):
                R["predict"][key] = [label_agreement(os.path.join(a, f), os.path.join(b, f))
                                     for f in sorted(os.listdir(a)) if f.endswith(".nii.gz") and os.path.exists(os.path.join(b, f))]
    except Exception as e:  # noqa: BLE001
        R["predict"]["B_ct_error"] = repr(e)
    save()


# 2b. Training on real batches (a 3-case phantom subset, fold 0 = 2 train + 1 validation case):
#     f32, bf16 and f16 (loss-scaled) losses side by side, with the validation pass between epochs.
def train_checks():
    if A.train_data:
        # (f16 convolutions on a CPU take minutes: a dry run checks f32 and bf16.)
        for prec in ["f32", "bf16", "f16"][: 3 if A.backend == "tch-cuda" else 2]:
            if prec in R.get("train_check", {}) or over_budget(["train_check", prec]):
                continue
            train_check(prec)


# 2c. Data-parallel training: two ranks (`stu train --nproc 2`, both on GPU 0 of a one-GPU
#     machine), the ring all-reduce through host memory; losses must be finite and equal on resume.
def train_dp():
    if A.train_data and not over_budget(["train_dp"]):
        o = "/tmp/train_dp"
        shutil.rmtree(o, ignore_errors=True)  # a rerun on the same machine starts afresh
        rc, out, peak, wall = sh([A.stu, "train", A.train_data, "--out", o, "--base-width", "8", "--patch-size", "64,64,64", "--batch-size", "2",
                                  "--epochs", "2", "--iterations", "10", "--val-iterations", "2", "--backend", A.backend, "--precision", "bf16", "--nproc", "2"], timeout=150)
        logs = [json.loads(line) for line in open(f"{o}/log.jsonl")] if os.path.exists(f"{o}/log.jsonl") else []
        R["train_dp"] = {"rc": rc, "wall_s": wall, "peak_gib": peak, "epochs": [{k: e.get(k) for k in ("train_losses", "val_loss", "iterations_per_second")} for e in logs], "tail": out[-400:]}
        log("train_dp", rc, wall)
        save()


# 3 (the plan). Phase 1 is what item 4's goal and item 3's table need, most important first:
# H, L, B (PyTorch fp16 beside ours f16 in the default channels-last layout and in NCDHW with the
# split norm; H's and B's training also with the switchable changes since 2026-11-28 turned
# back), S, then the per-op profiles (H's and B's training step, B's patch)
# and f16 training on real batches. Phase 2 (a second call on the same warm machine, or the rest
# of one long call) holds the bf16 rows, the end-to-end checks and the extras (CUDA graphs, H's
# patch profile among them).
phase1, phase2, extra = [], [], []
for s in A.sizes:
    t, i = f"train_{s}_128_b2", f"infer_{s}_128"
    torch_too = A.torch_sizes is None or s in A.torch_sizes
    big = s != "S"
    # Training with the switchable upsampling, norm and weight-cast changes turned back (B, H):
    # what they gain (H's patch too, in phase 2: the weight cast is its part).
    # H's training with the two switches of 2026-11-29 (the top level's channel-changing
    # convolutions through NCDHW, zero bias gradients before a norm), alone and together, right
    # after the default: H's step is the one case of item 4 above 0.8×. B's and the patches in
    # phase 2.
    tries = ["stu-ncdhw-top", "stu-zero-bias-grad", "stu-top-zero"]
    phase1 += [("torch", t, "fp16")] * torch_too + [("stu", t, "f16")] + [(v, t, "f16") for v in tries] * (s == "H")
    phase1 += [("stu-before", t, "f16")] * (s in "BH") + [("stu-nc", t, "f16")] * big
    phase1 += [("torch", i, "fp16")] * torch_too + [("stu", i, "f16")] + [("stu-nc", i, "f16")] * big
    phase2 += [("stu", t, "bf16"), ("stu", i, "bf16")] + [("stu-before", i, "f16")] * (s == "H")
    phase2 += [(v, t, "f16") for v in tries] * (s == "B") + [("stu-ncdhw-top", i, "f16")] * (s in "BH")
    if s in "BH":
        extra += [("torch", t, "bf16"), ("torch", i, "bf16")] * torch_too
    # CUDA graphs gained nothing measurable on 2026-11-28 (B 11.02 vs 11.10 ms, H 89.2 vs 89.6,
    # L 35.0 vs 35.4): among the extras now.
    if big:
        extra += [("stu-graph", i, "f16")]
    if s == "B":
        extra += [("stu-nc-plane", t, "f16"), ("stu-nc-plane", i, "f16"), ("stu-nc-graph", i, "f16"), ("stu-d2", i, "f16"),
                  ("stu-generic", i, "f16"), ("stu-nosgd", t, "f16")]
# H's training step under both profilers first: the one case of item 4 still above 0.8× on
# 2026-11-28 (0.81×), never profiled; then B's step and patch.
if "H" in A.sizes and (A.torch_sizes is None or "H" in A.torch_sizes):
    phase1 += [("profile", "train_H_128_b2", "f16")]
profiles = "B" in A.sizes and (A.torch_sizes is None or "B" in A.torch_sizes)
phase1 += [("profile", "train_B_128_b2", "f16"), ("profile", "infer_B_128", "f16")] * profiles + [("train_check", "", "f16")]
# H's patch under both profilers (profiled on 2026-11-28: 92.8 vs 115.0 ms of kernels, half of
# it cuDNN's convolutions on both sides): among the extras.
if "H" in A.sizes and (A.torch_sizes is None or "H" in A.torch_sizes):
    extra += [("profile", "infer_H_128", "f16")]
# Whole-volume sliding windows next to PyTorch's (`shared/bench/gpu_sliding_window.py`'s
# algorithm in `torch_gpu.py`): the anchor's 512×512×300 CT at 1.5 mm, B and H, no TTA, first in
# phase 2 (never timed side by side before); B with TTA among the extras.
window = [(side, f"window_{s}_ct300", dt) for s in "BH" if s in A.sizes for side, dt in (("torch", "fp16"), ("stu", "f16"))]
phase2 = window + phase2
if "B" in A.sizes:
    extra += [("torch", "window_B_ct300_tta", "fp16"), ("stu", "window_B_ct300_tta", "f16")]
phase2 += [("call", predict_ct, ""), ("call", train_dp, ""), ("call", train_checks, ""), ("call", predict_mr, "")]
def burn_cuda():
    """burn's own CUDA backend (CubeCL: its kernels, compiled at run time by NVRTC, no cuDNN),
    from the `cuda` build (`--stu-cuda`): parity in f32 and f16, then B's patch and training
    step in f16 beside the rows above (the first call of each kernel compiles and autotunes it,
    inside the warm-up steps)."""
    if not A.stu_cuda:
        return
    rc, out, _, _ = sh([A.stu_cuda, "--version"], timeout=30)
    R["burn_cuda"] = {"version": out.strip()[-200:], "parity": {}}
    ok = parity(A.stu_cuda, "cuda", ["f32", "f16"], R["burn_cuda"]["parity"], timeout=150)
    save()
    # burn-cubecl's gradients against flex (`stu check-ops` on a CubeCL backend): the four bugs
    # found on lavapipe and worked around (2026-11-29), and every model's training step; all
    # 30 lines kept (each names its case).
    if ok:
        rc, out, _, wall = sh([A.stu_cuda, "check-ops", "--backend", "cuda"], timeout=240)
        R["burn_cuda"]["check_ops"] = {"rc": rc, "wall_s": wall, "tail": out[-12000:]}
        log("check-ops", "cuda", rc, out.strip().splitlines()[-1] if out.strip() else "")
        save()
    for case, prec, timeout in [("infer_B_128", "f16", 150), ("train_B_128_b2", "f16", 180)]:
        if not ok or time.time() - T0 > A.budget:
            R["skipped"].append(["burn-cuda", case, prec])
            continue
        row = ours(case, prec, timeout=timeout, stu=A.stu_cuda, backend="cuda")
        row["side"] = "burn-cuda"
        R["bench"].append(row)
        log("bench", json.dumps({k: v for k, v in row.items() if k not in ("samples_ms", "error")}))
        save()
        ok = row["rc"] == 0


# burn's own CUDA backend first among the extras: never run on a GPU before.
phase2 += [("call", burn_cuda, "")]
# What the ATen paths gain (B training without the ATen loss, burn's generic inference in bf16),
# and STU-Net's 3³ convolutions shape by shape through each algorithm (`conv_algos.py`).
if "B" in A.sizes:
    extra += [("stu-noloss", "train_B_128_b2", "bf16"), ("stu-generic", "infer_B_128", "bf16")]
phase2 += extra + [("call", conv_algos, "")]
if A.backend == "tch-cuda":
    if A.phase in ("1", "all"):
        run_plan(phase1)
    if A.phase in ("2", "all"):
        left = [tuple(x) for x in R.get("phase1_skipped", [])]
        run_plan([x for x in phase1 if (x[0], getattr(x[1], "__name__", x[1]), x[2]) in left] + phase2)
else:
    # A dry run on the CPU: the profiling path with S's patch inference (seconds there), the
    # end-to-end checks (parity above, prediction and training below) on the CPU.
    if "S" in A.sizes:
        R["profiles"] = [profile_pair("infer_S_128", "f32")]
        log("profile", json.dumps(R["profiles"][0]))
        save()
    run_plan([x for x in phase2 if x[0] == "call"])


# 4. Tables, and the profiles' traces in one archive.
if TRACES:
    with tarfile.open(os.path.join(A.out, f"traces_phase{A.phase}.tar.gz"), "w:gz") as tar:
        for path, name in TRACES:
            tar.add(path, arcname=name)

md = [f"GPU: {R.get('gpu')}; PyTorch {R.get('torch')}, cuDNN {R.get('cudnn')}; {R['started']}", ""]
md += ["| precision | worst max abs diff / max abs ref over the 5 outputs |", "|---|---|"]
def parity_cell(v):
    """A precision's worst error, or why it has none (an exception before any precision ran is
    kept as `error`: a string)."""
    return f"{v.get('worst_rel', v.get('error', '')) if isinstance(v, dict) else v!s:.80}"


for p, v in R["parity"].items():
    md.append(f"| {p} | {parity_cell(v)} |")
for p, v in R.get("burn_cuda", {}).get("parity", {}).items():
    md.append(f"| {p} (burn-cuda) | {parity_cell(v)} |")
md += ["", "| case | side | dtype | ms | peak GiB (NVML) | torch peak alloc GiB |", "|---|---|---|---|---|---|"]
for r in R["bench"]:
    md.append(f"| {r['case']} | {r['side']} | {r['dtype']} | {r.get('ms', 'rc=' + str(r['rc']))} | {r['peak_gib_nvml']} | {r.get('peak_allocated_gib', '')} |")
# Item 4's ratios: each of our rows (default and variants) over PyTorch's fp16 row of the same
# case, time and NVML peak, so that the layout and norm defaults can be chosen from one table.
ref = {r["case"]: r for r in R["bench"] if r["side"] == "torch" and r["dtype"] == "fp16" and "ms" in r}
ours_rows = [r for r in R["bench"] if r["side"] != "torch" and "ms" in r and r["case"] in ref]
if ours_rows:
    md += ["", "| case | ours (side, dtype) | ms | / PyTorch fp16 | peak GiB | / PyTorch peak |", "|---|---|---|---|---|---|"]
    for r in sorted(ours_rows, key=lambda r: (r["case"], r["side"], r["dtype"])):
        t = ref[r["case"]]
        mem = f"{r['peak_gib_nvml'] / t['peak_gib_nvml']:.2f}×" if r.get("peak_gib_nvml") and t.get("peak_gib_nvml") else ""
        md.append(f"| {r['case']} | {r['side']} {r['dtype']} | {r['ms']} | {r['ms'] / t['ms']:.3f}× | {r.get('peak_gib_nvml')} | {mem} |")
    # Item 4 at a glance: our fastest configuration per case (and H training's leanest), against
    # the goal of 0.8× PyTorch's time (and memory for H training).
    md += ["", "| case | fastest of ours | ms | / PyTorch fp16 | ≤ 0.8×? |", "|---|---|---|---|---|"]
    for case in sorted({r["case"] for r in ours_rows}):
        best = min((r for r in ours_rows if r["case"] == case), key=lambda r: r["ms"])
        ratio = best["ms"] / ref[case]["ms"]
        md.append(f"| {case} | {best['side']} {best['dtype']} | {best['ms']} | {ratio:.3f}× | {'yes' if ratio <= 0.8 else 'no'} |")
    lean = [r for r in ours_rows if r["case"].startswith("train_H") and r.get("peak_gib_nvml")]
    if lean and ref.get(lean[0]["case"], {}).get("peak_gib_nvml"):
        r = min(lean, key=lambda r: r["peak_gib_nvml"])
        ratio = r["peak_gib_nvml"] / ref[r["case"]]["peak_gib_nvml"]
        md.append(f"| {r['case']} memory | {r['side']} {r['dtype']} | {r['peak_gib_nvml']} GiB | {ratio:.3f}× | {'yes' if ratio <= 0.8 else 'no'} |")
if "check_ops" in R:
    md += ["", f"check-ops: rc {R['check_ops']['rc']} ({R['check_ops']['tail'].strip().splitlines()[-1] if R['check_ops']['tail'].strip() else ''})"]
for r in R.get("profiles", []):
    md += ["", f"Per-op profile, {r['case']} ({r['dtype']}{', ' + r['variant'] if r.get('variant') else ''}): " + (r.get("table") or r.get("error", "")[:300])]
md += ["", "| prediction | rc | wall s | peak GiB |", "|---|---|---|---|"]
for k, v in R["predict"].items():
    if isinstance(v, dict):
        md.append(f"| {k} | {v['rc']} | {v['wall_s']} | {v['peak_gib']} |")
open(os.path.join(A.out, "suite.md"), "w").write("\n".join(md) + "\n")
save()
log("\n".join(md))
log(f"done in {time.time() - T0:.0f} s; skipped: {R['skipped']}")
