"""Does PyTorch learn the phantom faster per iteration than `stu train`? The same base-8 STU-Net
(`../shared/bench/torch_ref.py`), nnU-Net 2.8.1's own DC_and_CE_loss in its DeepSupervisionWrapper
(weights 2^-i, lowest 0), SGD lr 1e-2 Nesterov 0.99 wd 3e-5, clip 12, poly per 100 iterations, on
`stu preprocess` output (fold 0 of splits_final.json), batch 2, 48x64x64 random crops, no
augmentation; every 100 iterations the hard pseudo Dice of 10 validation batches (TP/FP/FN summed,
as nnU-Net's online evaluation). Compare with
`stu train PRE --base-width 8 --blocks 1 --patch-size 48,64,64 --no-augmentation --iterations 100`.
Usage: python torch_phantom_learn.py PREPROCESSED ITERATIONS   (2 threads)"""
import json, os, sys, time, numpy as np, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '../../../shared/bench'))
from torch_ref import STUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
torch.set_num_threads(2); torch.manual_seed(0); rng = np.random.default_rng(0)
pre = sys.argv[1]; its = int(sys.argv[2]); P = (48, 64, 64)
split = json.load(open(f'{pre}/splits_final.json'))[0]
def load(i):
    m = json.load(open(f'{pre}/{i}.json')); s = m['shape']
    d = np.fromfile(f'{pre}/{i}_data.f32', '<f4').reshape(s); g = np.fromfile(f'{pre}/{i}_seg.i16', '<i2').reshape(s[1:])
    return d, g
tr = [load(i) for i in split['train']]; va = [load(i) for i in split['val']]
def crop(d, g):
    c = [rng.integers(0, max(1, d.shape[1 + a] - P[a] + 1)) for a in range(3)]
    out = np.zeros((1,) + P, np.float32); seg = np.zeros(P, np.int64)
    dd = d[:, c[0]:c[0] + P[0], c[1]:c[1] + P[1], c[2]:c[2] + P[2]]; gg = g[c[0]:c[0] + P[0], c[1]:c[1] + P[1], c[2]:c[2] + P[2]]
    out[:, :dd.shape[1], :dd.shape[2], :dd.shape[3]] = dd; seg[:gg.shape[0], :gg.shape[1], :gg.shape[2]] = np.maximum(gg, 0)
    return out, seg
def batch(cases):
    xs, ys = zip(*[crop(*cases[rng.integers(len(cases))]) for _ in range(2)])
    x = torch.from_numpy(np.stack(xs)); y = torch.from_numpy(np.stack(ys))
    ts = [y]
    for k in range(1, 5):
        s = 2 ** k; ts.append(torch.nn.functional.interpolate(y[:, None].float(), size=tuple(p // s for p in P), mode='nearest')[:, 0].long())
    return x, [t[:, None] for t in ts]
K = 16
net = STUNet(1, K, [1] * 6, [8, 16, 32, 64, 128, 128], [[2, 2, 2]] * 4 + [[1, 1, 1]])
w = np.array([1 / 2 ** i for i in range(5)]); w[-1] = 0; w = w / w.sum()
loss_fn = DeepSupervisionWrapper(DC_and_CE_loss({'batch_dice': False, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {}, weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss), w)
opt = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
t0 = time.time()
for it in range(its):
    for g in opt.param_groups: g['lr'] = 1e-2 * (1 - (it // 100) / (its // 100)) ** 0.9
    x, ys = batch(tr); outs = net(x); l = loss_fn(outs, ys)
    opt.zero_grad(); l.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 12); opt.step()
    if (it + 1) % 100 == 0:
        tp = np.zeros(K); fp = np.zeros(K); fn = np.zeros(K)
        with torch.no_grad():
            for _ in range(10):
                x, ys = batch(va); p = net(x)[0].argmax(1); y = ys[0][:, 0]
                for c in range(1, K):
                    tp[c] += ((p == c) & (y == c)).sum().item(); fp[c] += ((p == c) & (y != c)).sum().item(); fn[c] += ((p != c) & (y == c)).sum().item()
        d = 2 * tp[1:] / np.maximum(2 * tp[1:] + fp[1:] + fn[1:], 1)
        print(it + 1, round(l.item(), 3), round(d.mean(), 3), np.round(d, 2).tolist(), f'{time.time() - t0:.0f}s', flush=True)
