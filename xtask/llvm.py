"""Puts an LLVM where burn's `cuda` feature looks for one, from Debian's packages (nothing else
is reachable from the build machines), so that `--features cuda` builds here.

burn-cuda 0.22.1 → cubecl-cuda 0.11 → cubecl-llvm links LLVM statically through
tracel-llvm-bundler, whose build script downloads a prebuilt LLVM 23.1 from GitHub unless its
install marker already exists under $XDG_DATA_HOME/tracel (~/.local/share/tracel). Debian's
unstable suite carries LLVM 23.1 (`llvm-23-dev`, with the static libraries; `llvm-23`, with
`llvm-config`). This script

  python3 xtask/llvm.py [DIR]          # DIR default ~/.cache/stu-net/llvm

downloads those two packages into DIR/debs (~72 MB; the newest 23.1.x in unstable's index),
unpacks them into DIR/root (~500 MB), and writes the bundler's folder: include/ and lib/ linked
to Debian's, the install marker, and a `bin/llvm-config` that runs Debian's and answers as the
bundle would (system libraries as `-lNAME`, without Polly, a package of its own that nothing
here links). Debian's `llvm-config` runs on Debian 12 (it needs libz3.so.4, libzstd, zlib);
linking needs `libzstd-dev`, `libz3-dev` and `libxml2-dev`. The static libraries were compiled
against a newer glibc: `stu-engine`'s build script (feature `cuda`) compiles the three C23
`strtol` entry points they call, which Debian 12's glibc lacks.
Then: CUDARC_CUDA_VERSION=13000 cargo build --release -p stu-harness --features cuda
(README: "GPU backends")."""
import glob
import io
import lzma
import os
import re
import subprocess
import sys
import tarfile
import urllib.request

MIRROR = "http://deb.debian.org/debian"
SUITE = "sid"
MAJOR, MINOR = 23, 1
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/stu-net/llvm"))


def bundler_version():
    """The tracel-llvm-bundler version Cargo.lock pins (its folder name carries it)."""
    lock = open(os.path.join(root, "Cargo.lock")).read()
    m = re.search(r'name = "tracel-llvm-bundler"\nversion = "([^"]+)"', lock)
    if not m:
        sys.exit("Cargo.lock has no tracel-llvm-bundler: run `cargo generate-lockfile` with the `cuda` feature's dependencies first")
    return m.group(1)


def packages():
    """`Package → (version, Filename)` for LLVM 23.1's two packages in unstable's index."""
    url = f"{MIRROR}/dists/{SUITE}/main/binary-amd64/Packages.xz"
    print("reading", url, flush=True)
    text = lzma.decompress(urllib.request.urlopen(url, timeout=300).read()).decode("utf-8", "replace")
    found = {}
    for stanza in text.split("\n\n"):
        f = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" "))
        if f.get("Package") in (f"llvm-{MAJOR}-dev", f"llvm-{MAJOR}") and f.get("Architecture") == "amd64":
            found[f["Package"]] = (f["Version"], f["Filename"])
    for name in (f"llvm-{MAJOR}-dev", f"llvm-{MAJOR}"):
        if name not in found:
            sys.exit(f"{SUITE} has no {name} any more: pick another suite or LLVM release in xtask/llvm.py")
        if not re.match(rf"^(\d+:)?{MAJOR}\.{MINOR}\.", found[name][0]):
            sys.exit(f"{SUITE}'s {name} is {found[name][0]}, not {MAJOR}.{MINOR}.x as cubecl-llvm's llvm-sys expects")
    return found


def unpack_deb(path, dest):
    """`dpkg-deb -x`, by hand: a .deb is an ar archive whose data.tar.* holds the files."""
    data = open(path, "rb").read()
    assert data[:8] == b"!<arch>\n", f"{path}: not a .deb"
    i = 8
    while i < len(data):
        name, size = data[i:i + 16].decode().strip().rstrip("/"), int(data[i + 48:i + 58])
        body = data[i + 60:i + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as t:
                # Absolute links (into the packages' /usr/share/doc) are not needed and would
                # point outside `dest`.
                keep = [m for m in t.getmembers() if not (m.issym() and os.path.isabs(m.linkname))]
                t.extractall(dest, members=keep)
            return
        i += 60 + size + (size & 1)
    sys.exit(f"{path}: no data.tar member")


version = bundler_version()
debs = os.path.join(out, "debs")
os.makedirs(debs, exist_ok=True)
tree = os.path.join(out, "root")
for name, (ver, filename) in packages().items():
    path = os.path.join(debs, os.path.basename(filename))
    if not os.path.exists(path):
        print("downloading", filename, ver, flush=True)
        urllib.request.urlretrieve(f"{MIRROR}/{filename}", path + ".part")
        os.replace(path + ".part", path)
    for old in glob.glob(os.path.join(debs, f"{name}_*.deb")):
        if old != path:
            os.remove(old)
    unpack_deb(path, tree)

prefix = os.path.join(tree, "usr", "lib", f"llvm-{MAJOR}")
real = os.path.join(prefix, "bin", "llvm-config")
got = subprocess.run([real, "--version"], capture_output=True, text=True)
if got.returncode != 0:
    sys.exit(f"{real} does not run here: {got.stderr.strip()}")
data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
bundle = os.path.join(data_home, "tracel", f"tracel-llvm-{version}")
os.makedirs(os.path.join(bundle, "bin"), exist_ok=True)
for d in ("include", "lib"):
    link = os.path.join(bundle, d)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.join(prefix, d), link)
wrapper = os.path.join(bundle, "bin", "llvm-config")
with open(wrapper, "w") as f:
    f.write(f"""#!/bin/sh
# Debian's llvm-config ({got.stdout.strip()}), answering as tracel-llvm-bundler's bundle would
# (written by xtask/llvm.py).
out="$('{real}' "$@")" || exit $?
case " $* " in
  *" --system-libs "*) printf '%s\\n' "$out" | sed -e 's#[^ ]*/lib\\([A-Za-z0-9_+-]*\\)\\.so#-l\\1#g' ;;
  *" --libs "*|*" --libnames "*) printf '%s\\n' "$out" | tr ' ' '\\n' | grep -v -E '^(-l|lib)Polly' | tr '\\n' ' ' | sed -e 's/ $//'; echo ;;
  *) printf '%s\\n' "$out" ;;
esac
""")
os.chmod(wrapper, 0o755)
open(os.path.join(bundle, ".tracel-llvm-installed"), "w").close()
print(f"LLVM {got.stdout.strip()} from Debian {SUITE} in {tree}; tracel-llvm-bundler {version} reads {bundle}")
print("next: CUDARC_CUDA_VERSION=13000 cargo build --release -p stu-harness --features cuda")
