# Source this before running a `stu` built with the `tch` feature against the GPU libtorch
# (README: "GPU backends"): puts the torch/lib and nvidia/*/lib folders of the PyTorch that
# `python3` imports (2.11.0, CUDA 13.0) on LD_LIBRARY_PATH.
#   . xtask/tch-env.sh            (or: STU_PYTHON=/path/to/python . xtask/tch-env.sh)
_stu_sp="$("${STU_PYTHON:-python3}" -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')" || return 1
_stu_libs="$_stu_sp/torch/lib"
for _d in $(find "$_stu_sp/nvidia" -maxdepth 3 -name lib -type d 2>/dev/null); do _stu_libs="$_stu_libs:$_d"; done
export LD_LIBRARY_PATH="$_stu_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _stu_sp _stu_libs _d
