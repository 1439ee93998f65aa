#!/usr/bin/env bash
# Prepares `.gpu/` (git-ignored) for a run of the GPU suite on a lent machine that has PyTorch
# 2.11 (CUDA 13.0) but no Rust toolchain or network: the `stu` binary built here against the GPU
# libtorch, the PyTorch reference model, the parity fixture, two real volumes and a 3-case
# preprocessed phantom subset for the training check (≈ 53 MB in all with the `cuda` build; the device tool carries 64 MiB).
#
#   xtask/gpu-carry.sh [LIBTORCH_ROOT]        # default ~/.cache/stu-net/libtorch (cargo xtask libtorch)
#
# Then, through the device tool, with `.gpu` carried:
#   SP=$(python3 -c 'import torch,os;print(os.path.dirname(os.path.dirname(torch.__file__)))');
#   export LD_LIBRARY_PATH=$SP/torch/lib:$(find $SP/nvidia -maxdepth 3 -name lib -type d | tr '\n' ':');
#   python3 xtask/bench/gpu_suite.py --stu .gpu/stu.xz --bench-dir .gpu/bench --fixture .gpu/tiny_iso.safetensors \
#     --mr .gpu/mr --ct .gpu/ct --train-data .gpu/train --out $OUT --budget 470 --phase 1 \
#     [--stu-cuda .gpu/stu-cuda.xz --cuda-include .gpu/cuda-include.tar.xz]
# (the binaries travel xz-compressed, the suite unpacks them; the `cuda` build, burn's own CUDA
# backend, comes along when `cargo xtask llvm` has put an LLVM for it here, and its parity and
# B's rows run in phase 2)
# (device tool: timeout_s 585; parity, `stu check-ops`, H, L, B and S in f16 beside PyTorch's
# fp16, in the default channels-last layout and in NCDHW (split norm), H's training also with
# the switches of 2026-11-29 (`stu-ncdhw-top`, `stu-zero-bias-grad`, both: `stu-top-zero`), H's and
# B's training with the switchable channels-last changes of 2026-11-28 turned back (`stu-before`), H's and B's
# training-step profiles, B's patch profile and the f16 training check; estimated ~420 s on an
# H200), then at once, while the machine is warm (it is handed back after 30 s idle), the same
# command with `--phase 2 --budget N` (N: the device time left less 100 s): what phase 1 skipped
# for time, the bf16 rows, the end-to-end checks and the extras (CUDA graphs among them). One long call
# is `--phase all`; see the suite's section 3.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
lt="${1:-$HOME/.cache/stu-net/libtorch}"
shared="$root/../shared"
target="${CARGO_TARGET_DIR:-$HOME/.cache/stu-net/target-tch-gpu}"
test -d "$lt/gpu/lib" || { echo "no $lt/gpu: run \`cargo xtask libtorch $lt\` first" >&2; exit 1; }
(cd "$root" && CARGO_TARGET_DIR="$target" LIBTORCH="$lt/gpu" LIBTORCH_BYPASS_VERSION_CHECK=1 \
  cargo build --release -p stu-harness --features tch)
rm -rf "$root/.gpu" && mkdir -p "$root/.gpu"/{bench,mr,ct,train}
strip -o "$root/.gpu/stu" "$target/release/stu"
xz -T2 -6 "$root/.gpu/stu"   # → stu.xz: the device tool carries at most 64 MiB
# burn's own CUDA backend (feature `cuda`), where `cargo xtask llvm` has put the LLVM its build
# links; the CUDA headers its run-time compiler reads, from the libtorch folder's wheels.
if ls "${XDG_DATA_HOME:-$HOME/.local/share}"/tracel/tracel-llvm-*/.tracel-llvm-installed >/dev/null 2>&1; then
  cuda_target="${STU_CUDA_TARGET:-$HOME/.cache/stu-net/target-cuda}"
  (cd "$root" && CARGO_TARGET_DIR="$cuda_target" CUDARC_CUDA_VERSION=13000 cargo build --release -p stu-harness --features cuda)
  strip -o "$root/.gpu/stu-cuda" "$cuda_target/release/stu"
  xz -T2 -6 "$root/.gpu/stu-cuda"
  tar -C "$lt/x/nvidia/cu13" -cJf "$root/.gpu/cuda-include.tar.xz" include
else
  echo "no LLVM for the \`cuda\` feature (cargo xtask llvm): .gpu without stu-cuda" >&2
fi
cp "$shared/bench/torch_ref.py" "$root/.gpu/bench/"
cp "$shared/fixtures/stunet-parity/tiny_iso.safetensors" "$root/.gpu/"
cp "$shared/data/Dataset802_TotalSegExampleMR/imagesTr/ts_mr_sm_0000.nii.gz" "$root/.gpu/mr/"
cp "$shared/data/Dataset801_TotalSegExampleCT/imagesTr/ts_ct_full_0000.nii.gz" "$root/.gpu/ct/"
# A 3-case phantom subset, preprocessed here by the default (CPU) build (fold 0: 2 training
# cases, 1 validation case).
cpu_target="${STU_CPU_TARGET:-$HOME/.cache/stu-net/target}"
(cd "$root" && CARGO_TARGET_DIR="$cpu_target" cargo build --release -p stu-harness --bin stu)
cpu_stu="$cpu_target/release/stu"
tmp="$(mktemp -d)"
"$cpu_stu" quickstart --data-only --out "$tmp" >/dev/null
pre="$tmp/preprocessed"
cp "$pre/dataset.json" "$pre/plans.json" "$root/.gpu/train/"
for c in phantom_000 phantom_001 phantom_002; do cp "$pre/$c"* "$root/.gpu/train/"; done
echo '[{"train": ["phantom_001", "phantom_002"], "val": ["phantom_000"]}]' > "$root/.gpu/train/splits_final.json"
du -sh "$root/.gpu"
