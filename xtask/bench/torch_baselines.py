"""The baselines' side of `stu bench plainconv unetr swinunetr nnformer`: nnU-Net's PlainConvUNet
(dynamic_network_architectures, default 3d_fullres network: 1 channel, 105 classes, 6 stages,
32…320 features) at 1×1×128³, timed as `../shared/bench/cpu_anchor.py` times STU-Net (2 threads,
float32, median; forward without deep supervision; forward+backward back-propagates mean(output.0)
of the deep-supervision forward), then MONAI's UNETR and SwinUNETR at their defaults the same way,
and nnFormer (the authors' Synapse network built for a 128³ crop) when NNFORMER_REF names the
authors' nnFormer_synapse.py (it is not on PyPI; see tests/fixtures/make_nnformer_fixture.py).
Usage: [NNFORMER_REF=PATH] python torch_baselines.py OUT.json [FAMILY…]   (default: all)"""
import json
import os
import sys
import time

import torch
from torch import nn

torch.set_num_threads(2)
WANTED = sys.argv[2:]
x = torch.randn(1, 1, 128, 128, 128)


def med(fn, n):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return round(ts[len(ts) // 2], 3)


def time_model(name, net, set_ds=None, first=lambda y: y):
    """Forward without deep supervision (when the model has it) and forward+backward of
    mean(first output) with it."""
    def fwd():
        if set_ds:
            set_ds(False)
        with torch.no_grad():
            net(x)

    def fb():
        if set_ds:
            set_ds(True)
        net.zero_grad(set_to_none=True)
        first(net(x)).mean().backward()

    R[f"{name}_128_fwd"] = {"fwd_s": med(fwd, 3)}
    R[f"{name}_128"] = {"fwd_bwd_s": med(fb, 2)}
    print(R, flush=True)


def want(name):
    return not WANTED or name in WANTED


R = {"torch": torch.__version__}
if want("plainconv"):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    m = PlainConvUNet(1, 6, [32, 64, 128, 256, 320, 320], nn.Conv3d, 3, [1, 2, 2, 2, 2, 2], 2, 105, 2, conv_bias=True,
                      norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                      nonlin_kwargs={"inplace": True}, deep_supervision=True)
    time_model("plainconv", m, lambda on: setattr(m.decoder, "deep_supervision", on), lambda y: y[0])
    del m
if want("unetr"):
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    time_model("unetr", UNETR(in_channels=1, out_channels=105, img_size=(128, 128, 128)))
if want("swinunetr"):
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    time_model("swinunetr", SwinUNETR(in_channels=1, out_channels=105))
if want("nnformer") and os.environ.get("NNFORMER_REF"):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/fixtures"))
    from make_nnformer_fixture import SYNAPSE, load_reference

    torch.manual_seed(0)
    nf = load_reference(os.environ["NNFORMER_REF"])(crop_size=[128, 128, 128], input_channels=1, num_classes=105, **SYNAPSE)
    time_model("nnformer", nf, lambda on: setattr(nf, "do_ds", on), lambda y: y[0])
json.dump(R, open(sys.argv[1], "w"), indent=1)
