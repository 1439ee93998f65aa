"""nnU-Net training step in PyTorch on the CPU, as `stu bench train_*` times it: STU-Net S or B,
batch 2, 1 channel, 128³, 105 classes, deep supervision (5 outputs, weights [8,4,2,1,0]/15),
Dice (no background, smooth 1e-5) + CE per output, backward, global-norm clip 12, SGD (lr 1e-2,
momentum 0.99, Nesterov, wd 3e-5). 2 threads, float32, median after one warm-up step.
`2d`: nnU-Net's 2-D PlainConvUNet (dynamic_network_architectures; 7 stages, 32 … 512
features, 3×3 kernels) at batch 12, 256², 6 deep-supervision outputs (`train_plain2d_256_b12`).
Usage: python torch_train.py SHARED_BENCH_DIR OUT.json [S B 2d]"""
import json
import sys
import time

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch_ref import build  # noqa: E402

torch.set_num_threads(2)


def dc_ce(logits, target):
    c = logits.shape[1]
    ce = F.cross_entropy(logits, target)
    p = logits.softmax(1)[:, 1:]
    dims = target.dim() - 1
    y = F.one_hot(target, c).permute(0, dims + 1, *range(1, dims + 1))[:, 1:].float()
    axes = tuple(range(2, 2 + dims))
    inter, sp, sy = (p * y).sum(axes), p.sum(axes), y.sum(axes)
    dc = (2 * inter + 1e-5) / (sy + sp + 1e-5).clamp_min(1e-8)
    return ce - dc.mean()


R = {"torch": torch.__version__, "threads": torch.get_num_threads()}
for size in sys.argv[3:] or ["S", "B"]:
    torch.manual_seed(0)
    if size == "2d":
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
        from torch import nn
        m = PlainConvUNet(1, 7, [32, 64, 128, 256, 512, 512, 512], nn.Conv2d, 3, [1] + [2] * 6, 2, 105, 2, True,
                          nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                          deep_supervision=True)
        x = torch.randn(12, 1, 256, 256)
        full = torch.randint(0, 105, (12, 256, 256))
        targets = [full[:, s // 2::s, s // 2::s] if s > 1 else full for s in (1, 2, 4, 8, 16, 32)]
        case = "train_plain2d_256_b12"
    else:
        m = build(size)
        m.deep_supervision = True
        x = torch.randn(2, 1, 128, 128, 128)
        full = torch.randint(0, 105, (2, 128, 128, 128))
        targets = [full[:, s // 2::s, s // 2::s, s // 2::s] if s > 1 else full for s in (1, 2, 4, 8, 16)]
        case = f"train_{size}_128_b2"
    raw = [1 / 2 ** i for i in range(len(targets))]
    raw[-1] = 0.0
    weights = [w / sum(raw) for w in raw]
    opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        outs = m(x)
        loss = sum(w * dc_ce(o, t) for w, o, t in zip(weights, outs, targets) if w > 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 12)
        opt.step()

    step()
    ts = []
    for _ in range(2):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    ts.sort()
    R[case] = {"train_s": round(ts[len(ts) // 2], 3), "samples": [round(t, 3) for t in ts]}
    print(size, R[case], flush=True)
json.dump(R, open(sys.argv[2], "w"), indent=1)
