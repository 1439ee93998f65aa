"""PyTorch's side of `stu bench allreduce`: one all-reduce (sum) of a float32 gradient buffer of
STU-Net-S/B/L's parameter count between two ranks on this machine, torch.distributed with Gloo
over loopback TCP (what PyTorch DDP uses without NCCL). 1 warm-up + 5 timed, median, rank 0's.

usage: python torch_allreduce.py [N ...]   (default: the S, B, L parameter counts)
"""
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COUNTS = {"allreduce_S_w2": 14596941, "allreduce_B_w2": 58262669, "allreduce_L_w2": 440302605}


def worker(rank, port, counts, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for case, n in counts.items():
        t = torch.full((n,), 1e-3 * (rank + 1), dtype=torch.float32)
        dist.all_reduce(t)
        samples = []
        for _ in range(5):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            samples.append(time.perf_counter() - t0)
        results[case] = statistics.median(samples)
        del t
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


if __name__ == "__main__":
    counts = COUNTS if len(sys.argv) < 2 else {f"allreduce_{n}": int(n) for n in sys.argv[1:]}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, counts, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get()
    for p in procs:
        p.join()
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "backend": "gloo", "results": res}, indent=1))
