r"""Does the pool start-up land on the marginals of the teacher's exact chain? (issue 12)

The exact start-up runs the teacher's ancestral chain from T-1 down to each state's start step t,
so a state at t is a draw from the chain's marginal q_T(x_t). A cheaper start-up is only as good
as the distance of its states from that marginal. For each option this prints, at each snapshot
step t, the deviation of two statistics from the exact chain's:

  mean ||x_t||^2 / D                  (the states' spread)
  mean ||eps_T(x_t, t)||^2 / D        (the size of the loss target at those states)

with a bootstrap standard error, and the option's cost in teacher forwards per state, averaged
over start steps uniform on 0..T-1 (the exact start-up costs (T-1)/2).

Pairing: state i of every option starts from the same noise x_{T-1} as reference chain i, and
the standard error is the bootstrap over pairs i (resampled together), so it counts the sampling
error of both sides. A state's path depends only on its own start step and noise, so filling
states at exactly the snapshot steps measures the same thing as filling a large pool with
uniform start steps and keeping the states near each snapshot, without the waste.

  digits  the built-in teacher (16x16x1, cosine T = 1000, learned-range variance); the
          reference is the exact chain on --ref-states states (about 950 forwards each)
  toy     data N(0, s^2 I) with the exact eps in closed form (fixed-small variance, cosine
          T = 1000): deviations from the true marginal a_t s^2 + 1 - a_t, no reference chain

Options (comma-separated, --options): exact; ddimK: K DDIM jumps per state, evenly spaced in t
(the previous default was ddim8); etaK: the same with eta = 1; dpmK: K steps of DPM-Solver++(2M)
per state; pdpmK / pddimK: DPM-Solver++(2M) / DDIM with ceil(K (T-1-t) / (T-1)) steps for a state
starting at t, one step size for all (pdpm48 is the default `init = "fast"`, `init_steps = 48`);
any of them +M: the jumps go to t + M, then M exact ancestral steps.

Examples (the tables in docs/benchmarks.md; --cache keeps the digits reference for a later run):
  python benchmarks/bench_startup.py toy --ref-states 2000 --dim 64 --ts 20,50,150,400,800 \
      --options ddim8,ddim32,eta8,eta32,ddim8+32,dpm16,dpm24,dpm16+16,pdpm32,pdpm48,exact
  python benchmarks/bench_startup.py digits --ref-states 128 --options ddim8,dpm16,dpm24 --cache ref.npz
  python benchmarks/bench_startup.py digits --ref-states 128 --options pdpm48 --cache ref.npz
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dkdm_cli.diffusion.gaussian import GaussianDiffusion, VarianceType, _extract
from dkdm_cli.diffusion.schedules import cosine_betas
from dkdm_cli.distill.pool import StatePool, StepAllocation, fast_jumps, fill_pool, teacher_step

TeacherFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_OPTION = re.compile(r"^(exact|ddim|dpm|eta|pdpm|pddim)(\d*)(?:\+(\d+))?$")


class Counted:
    """A teacher callable that counts the states it is called on."""

    def __init__(self, fn: TeacherFn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += len(x)
        return self.fn(x, t)


def gaussian_teacher(diffusion: GaussianDiffusion, s2: float) -> TeacherFn:
    """The exact eps for data N(0, s2 I): E[eps | x_t] = sqrt(1 - a_t) x_t / (a_t s2 + 1 - a_t)."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _extract(diffusion.alphas_cumprod, t, x)
        return (1 - a).sqrt() * x / (a * s2 + 1 - a)  # (B, C, H, W)

    return eps


def _eps(diffusion: GaussianDiffusion, teacher: TeacherFn, x: torch.Tensor, t: torch.Tensor):
    pred, _ = diffusion.split_output(teacher(x, t), x.shape[1])
    return diffusion.eps_and_x0(pred, x_t=x, t=t)[0]  # (B, C, H, W)


def _eta_jumps(teacher: TeacherFn, diffusion: GaussianDiffusion, x: torch.Tensor, t: int, k: int,
               clip: bool, gen: torch.Generator) -> torch.Tensor:
    """k DDIM jumps with eta = 1 (the posterior q(x_s | x_t, x0_hat) with beta~ of the jump)."""
    top = diffusion.num_timesteps - 1
    k = min(k, top - t)
    steps = [top - ((top - t) * j) // k for j in range(k + 1)]
    for s, s2 in zip(steps[:-1], steps[1:], strict=True):
        tt = torch.full((len(x),), s, dtype=torch.long)
        step = diffusion.p_mean_variance(teacher(x, tt), x_t=x, t=tt, clip_denoised=clip)
        a, a2 = float(diffusion.alphas_cumprod[s]), float(diffusion.alphas_cumprod[s2])
        var = (1 - a2) / (1 - a) * (1 - a / a2)
        x = (math.sqrt(a2) * step.pred_x0 + math.sqrt(max(1 - a2 - var, 0.0)) * step.eps
             + math.sqrt(var) * torch.randn(x.shape, generator=gen))
    return x


def run_option(option: str, *, teacher: TeacherFn, diffusion: GaussianDiffusion, noise: torch.Tensor,
               t: int, clip: bool, gen: torch.Generator) -> torch.Tensor:
    """States at step t (R, C, H, W) from `noise` at T-1 by one start-up option."""
    kind, k, m = _parse(option)
    top = diffusion.num_timesteps - 1
    m = min(m, top - t)
    if kind == "eta":
        x = _eta_jumps(teacher, diffusion, noise.clone(), t + m, k, clip, gen)
    else:
        pool = StatePool(noise.clone(), torch.full((len(noise),), t + m, dtype=torch.long),
                         num_timesteps=diffusion.num_timesteps, generator=gen)
        allocation = StepAllocation.PROPORTIONAL if kind.startswith("p") else StepAllocation.EQUAL
        fill_pool(pool, diffusion=diffusion, teacher_fn=teacher, init="fast" if k else "exact",
                  init_steps=k, chunk=len(noise), clip_denoised=clip,
                  order=1 if kind.endswith("ddim") else 2, allocation=allocation)
        x = pool.x
    for s in range(t + m, t, -1):  # the ancestral tail
        tt = torch.full((len(x),), s, dtype=torch.long)
        x = teacher_step(teacher, diffusion, x=x, t=tt, noise=torch.randn(x.shape, generator=gen),
                         clip_denoised=clip).x_next
    return x


def _parse(option: str) -> tuple[str, int, int]:
    match = _OPTION.match(option)
    if not match or (match[1] != "exact" and not match[2]):
        raise SystemExit(f"bad option {option!r}: expected exact or (ddim|dpm|eta|pddim|pdpm)K[+M]")
    return match[1], int(match[2] or 0), int(match[3] or 0)


def cost_per_state(option: str, num_timesteps: int) -> float:
    """Teacher forwards per state, averaged over start steps uniform on 0..T-1."""
    kind, k, m = _parse(option)
    spans = np.arange(num_timesteps)  # T-1-t for t = T-1..0
    if kind == "exact":
        return float(spans.mean())
    if kind.startswith("p"):
        jumps = fast_jumps(torch.as_tensor(np.maximum(spans - m, 0)), k=k, num_timesteps=num_timesteps)
        return float((jumps.numpy() + np.minimum(spans, m)).mean())
    return float(np.minimum(spans, k + m).mean())


def _stats(diffusion, teacher, x: torch.Tensor, t: int) -> np.ndarray:
    """Per-state ||x||^2 / D and ||eps_T(x, t)||^2 / D: (2, R)."""
    eps = _eps(diffusion, teacher, x, torch.full((len(x),), t, dtype=torch.long))
    return np.stack([x.flatten(1).pow(2).mean(1).numpy(), eps.flatten(1).pow(2).mean(1).numpy()])


def _deviation(ours: np.ndarray, ref: np.ndarray | None, truth: float | None, rng) -> tuple[float, float]:
    """(ratio - 1, bootstrap standard error) of mean(ours) against mean(ref) or a known truth."""
    idx = rng.integers(0, len(ours), size=(2000, len(ours)))
    if ref is None:
        boot = ours[idx].mean(1) / truth - 1
        return float(ours.mean() / truth - 1), float(boot.std())
    boot = ours[idx].mean(1) / ref[idx].mean(1) - 1  # pairs resampled together
    return float(ours.mean() / ref.mean() - 1), float(boot.std())


def reference_chain(teacher, diffusion, noise, ts, clip, gen) -> dict[int, np.ndarray]:
    """The exact ancestral chain from `noise`, snapshotted at each t in ts: {t: stats (2, R)}."""
    x, out = noise.clone(), {}
    for s in range(diffusion.num_timesteps - 1, min(ts) - 1, -1):
        tt = torch.full((len(x),), s, dtype=torch.long)
        res = teacher_step(teacher, diffusion, x=x, t=tt, noise=torch.randn(x.shape, generator=gen),
                           clip_denoised=clip)
        if s in ts:
            eps = diffusion.eps_and_x0(diffusion.split_output(res.teacher_out, x.shape[1])[0],
                                       x_t=x, t=tt)[0]
            out[s] = np.stack([x.flatten(1).pow(2).mean(1).numpy(), eps.flatten(1).pow(2).mean(1).numpy()])
        x = res.x_next
    return out


def _cached_reference(args, teacher, diffusion, noise, ts, clip) -> dict[int, np.ndarray]:
    """The reference chain's statistics, from --cache when it was made with the same settings."""
    key = f"{args.seed}-{args.ref_states}-{','.join(map(str, ts))}"
    path = Path(args.cache) if args.cache else None
    if path is not None and path.is_file():
        saved = np.load(path)
        if str(saved["key"]) == key:
            return {t: saved[f"t{t}"] for t in ts}
    ref = reference_chain(teacher, diffusion, noise, ts, clip, torch.Generator().manual_seed(1))
    if path is not None:
        np.savez(path, key=key, **{f"t{t}": v for t, v in ref.items()})
    return ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=("digits", "toy"))
    ap.add_argument("--options", default="ddim8,pdpm48")
    ap.add_argument("--ts", default="50,150,400,800", help="snapshot steps")
    ap.add_argument("--ref-states", type=int, default=128, help="states per t (both sides)")
    ap.add_argument("--s2", type=float, default=0.25, help="toy: data variance s^2")
    ap.add_argument("--dim", type=int, default=256, help="toy: dimensions D")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="", help="digits: .npz to keep the reference in and reuse")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ts = sorted({int(s) for s in args.ts.split(",")})
    options = args.options.split(",")
    for option in options:
        _parse(option)
    rng = np.random.default_rng(args.seed)
    if args.which == "digits":
        from dkdm_cli.api import load_teacher

        t_obj = load_teacher("digits")
        diffusion, clip, shape = t_obj.diffusion, t_obj.settings.clip_denoised, t_obj.sample_shape
        teacher = Counted(t_obj.model_output)
    else:
        diffusion = GaussianDiffusion(cosine_betas(1000), variance=VarianceType.FIXED_SMALL)
        clip, shape = False, (1, 1, args.dim)
        teacher = Counted(gaussian_teacher(diffusion, args.s2))
    T = diffusion.num_timesteps
    noise = torch.randn((args.ref_states, *shape), generator=torch.Generator().manual_seed(args.seed))
    ref = None
    started = time.perf_counter()
    if args.which == "digits":
        ref = _cached_reference(args, teacher, diffusion, noise, ts, clip)
        print(json.dumps({"reference": "exact chain", "states": args.ref_states,
                          "teacher_forwards": teacher.calls,
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    for option in options:
        gen = torch.Generator().manual_seed(2)
        row = {"option": option, "cost_per_state": round(cost_per_state(option, T), 1),
               "speedup_vs_exact": round(cost_per_state("exact", T) / cost_per_state(option, T), 1)}
        worst = 0.0
        for t in ts:
            x = run_option(option, teacher=teacher, diffusion=diffusion, noise=noise, t=t, clip=clip,
                           gen=gen)
            ours = _stats(diffusion, teacher, x, t)
            if ref is None:
                a = float(diffusion.alphas_cumprod[t])
                truths = (a * args.s2 + 1 - a, (1 - a) / (a * args.s2 + 1 - a))
                devs = [_deviation(ours[i], None, truths[i], rng) for i in range(2)]
            else:
                devs = [_deviation(ours[i], ref[t][i], None, rng) for i in range(2)]
            row[f"t{t}"] = {"x2": [round(100 * d, 2) for d in devs[0]],
                            "eps2": [round(100 * d, 2) for d in devs[1]]}
            worst = max(worst, abs(devs[0][0]), abs(devs[1][0]))
        row["worst_pct"] = round(100 * worst, 2)
        print(json.dumps(row), flush=True)
    print(json.dumps({"teacher_forwards": teacher.calls,
                      "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
