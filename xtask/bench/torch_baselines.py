"""The baselines' side of `stu bench plainconv unetr swinunetr`: nnU-Net's PlainConvUNet (dynamic_network_architectures,
default 3d_fullres network: 1 channel, 105 classes, 6 stages, 32…320 features) at 1×1×128³, timed
as `../shared/bench/cpu_anchor.py` times STU-Net (2 threads, float32, median; forward without deep
supervision; forward+backward back-propagates mean(output.0) of the deep-supervision forward), then
MONAI's UNETR and SwinUNETR at their defaults the same way.
Usage: python torch_baselines.py OUT.json"""
import json
import sys
import time

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

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
m = PlainConvUNet(1, 6, [32, 64, 128, 256, 320, 320], nn.Conv3d, 3, [1, 2, 2, 2, 2, 2], 2, 105, 2, conv_bias=True,
                  norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=True)
x = torch.randn(1, 1, 128, 128, 128)


def fwd():
    m.decoder.deep_supervision = False
    with torch.no_grad():
        m(x)


def fb():
    m.decoder.deep_supervision = True
    m.zero_grad(set_to_none=True)
    m(x)[0].mean().backward()


R = {"torch": torch.__version__, "plainconv_128_fwd": {"fwd_s": med(fwd, 3)}, "plainconv_128": {"fwd_bwd_s": med(fb, 2)}}
print(R, flush=True)

# MONAI's UNETR at its defaults (1 channel, 105 classes, 128^3); one output.
from monai.networks.nets import UNETR  # noqa: E402

torch.manual_seed(0)
u = UNETR(in_channels=1, out_channels=105, img_size=(128, 128, 128))


def ufwd():
    with torch.no_grad():
        u(x)


def ufb():
    u.zero_grad(set_to_none=True)
    u(x).mean().backward()


R["unetr_128_fwd"] = {"fwd_s": med(ufwd, 3)}
R["unetr_128"] = {"fwd_bwd_s": med(ufb, 2)}
print(R, flush=True)

# MONAI's SwinUNETR at its defaults; one output.
from monai.networks.nets import SwinUNETR  # noqa: E402

torch.manual_seed(0)
sw = SwinUNETR(in_channels=1, out_channels=105)


def sfwd():
    with torch.no_grad():
        sw(x)


def sfb():
    sw.zero_grad(set_to_none=True)
    sw(x).mean().backward()


R["swinunetr_128_fwd"] = {"fwd_s": med(sfwd, 3)}
R["swinunetr_128"] = {"fwd_bwd_s": med(sfb, 2)}
print(R, flush=True)
json.dump(R, open(sys.argv[1], "w"), indent=1)
