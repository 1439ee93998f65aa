"""Assembles the libtorch folders the `tch` feature builds against, from PyPI wheels (nothing
else is reachable from the build machines): PyTorch 2.11.0 (its Linux wheel on PyPI is the
CUDA 13.0 build, the same as the GPU machines' PyTorch) and the two CUDA runtime libraries
that libtorch_cpu.so links (cudart, cupti).

  python3 xtask/libtorch.py DIR

writes DIR/wheels (downloads, ~545 MB), DIR/x (the extracted torch/include and torch/lib), and
two link folders:
  DIR/cpu  libtorch without its CUDA library: binaries that run anywhere libtorch's CPU part
           does (backend `tch`; `tch-cuda` loads libtorch_cuda.so at run time from the library
           path, but burn-tch refuses GPU devices in such a build);
  DIR/gpu  with libtorch_cuda.so and the CUDA runtime headers (DIR/gpu/cuda-include): binaries
           for CUDA machines (backend `tch-cuda`), which need PyTorch 2.11's torch/lib and
           nvidia/*/lib folders on LD_LIBRARY_PATH at run time.
Build with LIBTORCH=DIR/gpu LIBTORCH_BYPASS_VERSION_CHECK=1 (README: "GPU backends")."""
import os
import subprocess
import sys
import zipfile

TORCH = "torch==2.11.0"
# (and the CUDA runtime headers, which include the crt ones of a wheel of their own)
CUDA = ["nvidia-cuda-runtime==13.0.96.*", "nvidia-cuda-cupti==13.0.85.*", "nvidia-cuda-crt==13.0.88.*"]

out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/stu-net/libtorch"))
wheels = os.path.join(out, "wheels")
os.makedirs(wheels, exist_ok=True)
pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", wheels]
# The Linux x86-64 wheels; tags named so that any host Python can fetch them.
subprocess.run(pip + ["--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", TORCH], check=True)
subprocess.run(pip + ["--python-version", "3.11", "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_25_x86_64",
                      "--platform", "manylinux2014_x86_64"] + CUDA, check=True)

x = os.path.join(out, "x")
for w in sorted(os.listdir(wheels)):
    if not w.endswith(".whl"):
        continue
    with zipfile.ZipFile(os.path.join(wheels, w)) as z:
        names = [n for n in z.namelist()
                 if n.startswith(("torch/include/", "torch/lib/", "nvidia/cu13/include/"))
                 or n.endswith(("libcudart.so.13", "libcupti.so.13"))]
        for n in names:
            dest = os.path.join(x, n)
            if not os.path.exists(dest):
                z.extract(n, x)
lib = os.path.join(x, "torch", "lib")
cu = os.path.join(x, "nvidia", "cu13", "lib")


def link(src, dst):
    if os.path.lexists(dst):
        os.remove(dst)
    os.symlink(src, dst)


for kind in ("cpu", "gpu"):
    d = os.path.join(out, kind)
    os.makedirs(os.path.join(d, "lib"), exist_ok=True)
    link(os.path.join(x, "torch", "include"), os.path.join(d, "include"))
    files = {"libtorch_cpu.so": os.path.join(lib, "libtorch_cpu.so"),
             # libtorch.so proper pulls in libtorch_cuda.so; the CPU part is all it must resolve.
             "libtorch.so": os.path.join(lib, "libtorch_cpu.so"),
             "libc10.so": os.path.join(lib, "libc10.so"),
             "libgomp.so.1": os.path.join(lib, "libgomp.so.1"),
             "libgomp.so": os.path.join(lib, "libgomp.so.1"),
             "libcudart.so.13": os.path.join(cu, "libcudart.so.13"),
             "libcupti.so.13": os.path.join(cu, "libcupti.so.13")}
    if kind == "gpu":
        # The CUDA runtime headers (`csrc/graph.cpp` includes ATen's CUDA graph API).
        link(os.path.join(x, "nvidia", "cu13", "include"), os.path.join(d, "cuda-include"))
        files["libtorch_cuda.so"] = os.path.join(lib, "libtorch_cuda.so")
        files["libc10_cuda.so"] = os.path.join(lib, "libc10_cuda.so")
    for name, src in files.items():
        assert os.path.exists(src), f"{src} missing from the wheels"
        link(src, os.path.join(d, "lib", name))
    print(f"{kind}: LIBTORCH={d}")
