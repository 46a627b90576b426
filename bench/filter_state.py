"""The calibrated filters' state alone at 10^4..10^7 keys, and the per-step gather between ranks.

Part 1 (state): builds each policy from its config over N keys, ``configs/filter/calibrated.yaml``
(the evidence rule: its looks every ``look_every`` micro-steps are in the per-step average) and
``calibrated_z.yaml`` (the robust-z rule, with the exact and the histogram drop limit), fills its
memory as a long run would (every key judged 0-10 times, bucket windows full), then times
``keep`` + ``observe`` on synthetic batches (half of the samples from 1% of the keys, whose
magnitudes are 1.3x larger; 10% uncaptioned). Reports milliseconds per step (wall, and CPU time
of the process, which a machine shared with other jobs inflates far less), bytes of per-key state
per key, and the checkpoint size (``torch.save`` of ``state_dict``). Inputs are made before timing.

Part 2 (gather): two gloo processes on this machine gather each step's six per-sample fields,
one collective per field (as ``accelerator.gather`` of a tuple does) against one packed float64
collective (``train.distributed.gather_columns``); microseconds per step.

    python bench/filter_state.py --pairs 1e4 1e5 1e6 1e7 --batch 256
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from filters.policy import build_policy

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "filter"
PER_KEY = {"calibrated": ("count", "total", "dropped"), "calibrated_z": ("count", "average", "dropped")}


def filled_policy(rule: str, num_pairs: int, quantile: str, seed: int = 0):
    """The default policy of ``rule`` over ``num_pairs`` keys with a memory as after a long run."""
    cfg = OmegaConf.load(CONFIGS / f"{rule}.yaml")
    if rule == "calibrated_z":
        cfg.quantile = quantile
    policy = build_policy(cfg, 1000, num_pairs)
    gen = torch.Generator().manual_seed(seed)
    state = policy.state_dict()
    state["values"] = torch.exp(0.3 * torch.randn(state["values"].shape, generator=gen))
    state["cursor"] = torch.full_like(state["cursor"], state["values"].shape[1])
    state["count"] = torch.randint(0, 11, (num_pairs,), generator=gen, dtype=torch.int32)
    if rule == "calibrated_z":
        state["average"] = torch.exp(0.2 * torch.randn(num_pairs, generator=gen))
    else:  # relative magnitudes N(0, 0.2) per judgement: totals and the pooled sum of squares to match
        state["total"] = 0.2 * state["count"].float().sqrt() * torch.randn(num_pairs, generator=gen)
        n = float(state["count"].sum())
        state["sums"] = torch.tensor([n, 0.04 * n + float((state["total"] ** 2).sum())], dtype=torch.float64)
    policy.load_state_dict(state)
    return policy


def batches(num_pairs: int, batch: int, steps: int, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    hot = max(1, num_pairs // 100)
    out = []
    for _ in range(steps):
        duplicated = torch.rand(batch, generator=gen) < 0.5
        pairs = torch.where(duplicated, torch.randint(0, hot, (batch,), generator=gen),
                            torch.randint(0, num_pairs, (batch,), generator=gen))
        magnitude = torch.exp(0.3 * torch.randn(batch, generator=gen)) * torch.where(duplicated, 1.3, 1.0)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        valid = torch.rand(batch, generator=gen) >= 0.1
        out.append((magnitude, t, valid, pairs))
    return out


def time_state(rule: str, num_pairs: int, quantile: str, batch: int, steps: int) -> dict:
    policy = filled_policy(rule, num_pairs, quantile)
    inputs = batches(num_pairs, batch, steps + 2)
    for magnitude, t, valid, pairs in inputs[:2]:  # warm-up
        policy.keep(magnitude, t, 0, pairs)
        policy.observe(magnitude, t, valid, pairs)
    start, cpu_start = time.perf_counter(), time.process_time()
    dropped = 0
    for step, (magnitude, t, valid, pairs) in enumerate(inputs[2:]):
        dropped += int((~policy.keep(magnitude, t, step, pairs)).sum())
        policy.observe(magnitude, t, valid, pairs)
    ms = (time.perf_counter() - start) / steps * 1e3
    cpu_ms = (time.process_time() - cpu_start) / steps * 1e3
    state = policy.state_dict()
    per_pair = sum(state[name].element_size() for name in PER_KEY[rule])
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return {"rule": rule, "pairs": num_pairs, "quantile": quantile if rule == "calibrated_z" else "-",
            "batch": batch, "steps": steps, "ms_per_step": round(ms, 3),
            "cpu_ms_per_step": round(cpu_ms, 3),
            "state_bytes_per_pair": per_pair, "checkpoint_mb": round(buffer.tell() / 2**20, 2),
            "dropped_fraction": round(dropped / (batch * steps), 3)}


def gather_worker(rank: int, port: int, batch: int, iterations: int, out: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    fields = (torch.rand(batch), torch.randint(0, 1000, (batch,)), torch.ones(batch, dtype=torch.bool),
              torch.ones(batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.bool),
              torch.randint(0, 10**7, (batch,)))

    def separate():
        for f in fields:
            f = f.to(torch.uint8) if f.dtype == torch.bool else f  # gloo gathers no bool
            dist.all_gather([torch.empty_like(f) for _ in range(2)], f)

    def packed():
        p = torch.stack([f.to(torch.float64) for f in fields], dim=1)
        dist.all_gather([torch.empty_like(p) for _ in range(2)], p)

    result = {}
    for name, fn in (("separate_6", separate), ("packed_1", packed)) * 2:  # twice: the second pass is reported
        times = []
        for _ in range(iterations):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[name] = round(statistics.median(times) * 1e6, 1)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def time_gather(batch: int, iterations: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=gather_worker, args=(r, port, batch, iterations, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join()
    return {"gather": "gloo, 2 processes", "batch_per_rank": batch, "median_us_per_step": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--batch", type=int, default=256, help="global batch: samples per step over all ranks")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--exact-steps", type=int, default=20, help="steps for the exact limit (O(pairs) each)")
    parser.add_argument("--gather-iterations", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for n in map(int, args.pairs):
        print(json.dumps(time_state("calibrated", n, "-", args.batch, args.steps)), flush=True)
        for quantile, steps in (("histogram", args.steps), ("exact", args.exact_steps)):
            print(json.dumps(time_state("calibrated_z", n, quantile, args.batch, steps)), flush=True)
    print(json.dumps(time_gather(args.batch // 2, args.gather_iterations)), flush=True)


if __name__ == "__main__":
    main()
