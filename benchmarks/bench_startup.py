"""Does a pool start-up land on the teacher chain's marginals, and at what cost?

Reference: R exact ancestral chains of the teacher from T-1 down, recording at every step t the
mean over chains of ||x_t||^2 / D and ||eps_T(x_t, t)||^2 / D (the teacher's eps at the state,
which the step computes anyway). Each option then fills a pool of N states (start steps uniform
over 0..T-1, as in training); for the states within +-W steps of each probe t in {50, 150, 400,
800} the same two figures are compared with the reference at each state's own step:

    deviation = mean over states of the figure / mean over states of reference[t_state] - 1

with a standard error combining both sides (the reference's taken over R independent chains).
Cost is the options' teacher sample-steps against the exact start-up's N*(T-1)/2. Options:

  fast k       DDIM (eta = 0), at most k jumps per state (the old default is k = 8)
  sddim k      stochastic DDIM (eta = 1: ancestral steps on the respaced process), at most k jumps
  ddimanc k+m  DDIM jumps (at most k) to t + m, then m exact ancestral steps
  chains K     ceil(N/K) exact ancestral chains, each handing K states to the pool (the default)

    python benchmarks/bench_startup.py --pool 6400 --reference 200
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from dkdm_cli.diffusion.gaussian import _extract
from dkdm_cli.distill.pool import StatePool, init_pool, teacher_step

PROBES = (50, 150, 400, 800)


def reference(teacher, chains: int, lowest: int, seed: int, batch: int = 256):
    """Per-step means (and per-chain values for the error) of ||x||^2/D and ||eps||^2/D."""
    d = teacher.diffusion
    T = d.num_timesteps
    gen = torch.Generator().manual_seed(seed)
    xs, es = torch.zeros(T, chains, dtype=torch.float64), torch.zeros(T, chains, dtype=torch.float64)
    for first in range(0, chains, batch):
        n = min(batch, chains - first)
        x = torch.randn((n, *teacher.sample_shape), generator=gen)
        for cur in range(T - 1, lowest - 1, -1):
            t = torch.full((n,), cur, dtype=torch.long)
            res = teacher_step(teacher.model_output, d, x=x, t=t,
                               noise=torch.randn(x.shape, generator=gen),
                               clip_denoised=teacher.settings.clip_denoised)
            c = x.shape[1]
            xs[cur, first:first + n] = x.double().pow(2).flatten(1).mean(1)
            es[cur, first:first + n] = res.teacher_out[:, :c].double().pow(2).flatten(1).mean(1)
            x = res.x_next
    return xs, es


def _jumps(teacher, pool: StatePool, target: torch.Tensor, k: int, eta: float, gen) -> int:
    """From T-1 to `target` (per state) in at most k DDIM jumps with this eta; returns steps."""
    d = teacher.diffusion
    top = d.num_timesteps - 1
    x = pool.x
    jumps = torch.clamp(top - target, max=k)
    span = (top - target).double()
    steps = 0
    for j in range(int(jumps.max())):
        active = (jumps > j).nonzero().squeeze(1)
        for chunk in active.split(512):
            ja = jumps[chunk].double()
            s = (top - torch.round(span[chunk] * j / ja)).long()
            s_next = (top - torch.round(span[chunk] * (j + 1) / ja)).long()
            xa = x[chunk]
            with torch.no_grad():
                out = teacher.model_output(xa, s)
                step = d.p_mean_variance(out, x_t=xa, t=s, clip_denoised=teacher.settings.clip_denoised)
            ab, ab_next = _extract(d.alphas_cumprod, s, xa), _extract(d.alphas_cumprod, s_next, xa)
            sigma = eta * ((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)).clamp(min=0).sqrt()
            noise = torch.randn(xa.shape, generator=gen)
            x[chunk] = (ab_next.sqrt() * step.pred_x0 + (1 - ab_next - sigma**2).clamp(min=0).sqrt()
                        * step.eps + sigma * noise).float()
            steps += len(chunk)
    return steps


def _ancestral(teacher, pool: StatePool, start: torch.Tensor, target: torch.Tensor, gen) -> int:
    """Exact ancestral steps from `start` down to `target` (per state); returns steps."""
    d = teacher.diffusion
    steps = 0
    cur = start.clone()
    while True:
        active = (cur > target).nonzero().squeeze(1)
        if len(active) == 0:
            return steps
        for chunk in active.split(512):
            xa = pool.x[chunk]
            res = teacher_step(teacher.model_output, d, x=xa, t=cur[chunk],
                               noise=torch.randn(xa.shape, generator=gen),
                               clip_denoised=teacher.settings.clip_denoised)
            pool.x[chunk] = res.x_next
            steps += len(chunk)
        cur[active] -= 1


def fill(teacher, option: str, value: int, extra: int, size: int, seed: int) -> tuple[StatePool, int]:
    """A pool of `size` states brought to uniform start steps by one option; (pool, cost)."""
    d = teacher.diffusion
    T = d.num_timesteps
    gen = torch.Generator().manual_seed(seed)
    if option in ("chains", "fast"):
        pool = init_pool(size=size, shape=tuple(teacher.sample_shape), diffusion=d,
                         teacher_fn=teacher.model_output, mode="dynamic", init=option,
                         init_steps=value, chunk=256, clip_denoised=teacher.settings.clip_denoised,
                         device=torch.device("cpu"), generator=gen, chain_states=value)
        return pool, pool.teacher_sample_steps
    x = torch.randn((size, *teacher.sample_shape), generator=gen)
    target = torch.randint(0, T, (size,), generator=gen)
    pool = StatePool(x, target, num_timesteps=T, generator=gen)
    if option == "sddim":
        return pool, _jumps(teacher, pool, target, value, 1.0, gen)
    # ddimanc k+m: DDIM to t + m, then m ancestral steps
    mid = (target + extra).clamp(max=T - 1)
    cost = _jumps(teacher, pool, mid, value, 0.0, gen)
    return pool, cost + _ancestral(teacher, pool, mid, target, gen)


def compare(teacher, pool: StatePool, ref_x, ref_e, window: int) -> dict:
    """Deviation and its standard error at each probe, for ||x||^2/D and ||eps||^2/D."""
    out = {}
    R = ref_x.shape[1]
    for probe in PROBES:
        sel = ((pool.t - probe).abs() <= window).nonzero().squeeze(1)
        x, t = pool.x[sel], pool.t[sel]
        with torch.no_grad():
            eps = teacher.model_output(x, t)[:, : x.shape[1]]
        row = {"states": len(sel)}
        for name, vals, ref in (("x2", x.double().pow(2).flatten(1).mean(1), ref_x),
                                ("eps2", eps.double().pow(2).flatten(1).mean(1), ref_e)):
            ref_at = ref[t]  # (n, R): the reference at each state's own step
            want = ref_at.mean()
            got = vals.mean()
            se_pool = vals.std() / math.sqrt(len(vals))
            se_ref = ref_at.mean(0).std() / math.sqrt(R)  # over independent chains
            row[name] = {"deviation_pct": round(100 * float(got / want - 1), 2),
                         "se_pct": round(100 * float((se_pool**2 + se_ref**2).sqrt() / want), 2)}
        out[str(probe)] = row
    return out


def main(argv: list[str] | None = None) -> int:
    from dkdm_cli.api import load_teacher

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="digits")
    ap.add_argument("--pool", type=int, default=6400, help="N (the default run's: rho 0.1, b 64)")
    ap.add_argument("--reference", type=int, default=200, help="exact reference chains R")
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--options", default="fast:8,fast:16,sddim:16,ddimanc:8+16,chains:25")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher)
    T = teacher.diffusion.num_timesteps
    start = time.perf_counter()
    ref_x, ref_e = reference(teacher, args.reference, min(PROBES) - args.window, args.seed)
    print(json.dumps({"reference_chains": args.reference, "seconds": round(time.perf_counter() - start)}),
          file=sys.stderr, flush=True)
    exact_cost = args.pool * (T - 1) / 2
    for spec in args.options.split(","):
        option, rest = spec.split(":")
        value, _, extra = rest.partition("+")
        start = time.perf_counter()
        pool, cost = fill(teacher, option, int(value), int(extra or 0), args.pool, args.seed + 1)
        seconds = time.perf_counter() - start
        result = compare(teacher, pool, ref_x, ref_e, args.window)
        worst = max(abs(r[k]["deviation_pct"]) for r in result.values() for k in ("x2", "eps2"))
        print(json.dumps({"option": spec, "pool": args.pool, "teacher_steps": cost,
                          "cheaper_than_exact": round(exact_cost / cost, 1),
                          "worst_abs_deviation_pct": worst, "seconds": round(seconds, 1),
                          "probes": result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
