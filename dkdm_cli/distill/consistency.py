"""The few-step objective: consistency distillation on the DKDM pool, with no data and no extra
teacher forward.

Each iteration the pool already gives b states x_t on the teacher's marginals, and the one
teacher forward at x_t (which also steps the pool) gives the teacher's clipped x_0 and eps there,
hence its probability-flow ODE (DDIM, eta = 0) neighbour

    x_{t-k} = sqrt(alpha_bar_{t-k}) x0_T + sqrt(1 - alpha_bar_{t-k}) eps_T.

The student's consistency function (diffusion/consistency.py) is trained to agree with a slowly
moving target copy of itself there:

    L = alpha_bar_t * mean || f_S(x_t, t) - f_target(x_{t-k}, t-k) ||^2,
    f_target(x, CLEAN) = x0_T  (t - k below step 0: the teacher's own x_0 is the boundary),

The weight alpha_bar_t (about min(SNR, 1)) measures the distance in eps units at high t and in
x_0 units at low t; without it the high-t pairs, whose x_0 targets are the least certain,
dominate (measured: docs/fewstep.md). The target network is an EMA of the student at
`consistency_target_ema` (0.95: fast enough to follow, slow enough not to chase its own noise);
the student's usual EMA (`ema_rate`) is what is sampled. Costs per iteration: the teacher
forward the pool makes anyway, the student's forward/backward, and one no-grad forward of the
target network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from dkdm_cli.diffusion import consistency as cm
from dkdm_cli.diffusion.gaussian import GaussianDiffusion, mean_flat
from dkdm_cli.distill.objective import LossTerms
from dkdm_cli.distill.pool import StepResult
from dkdm_cli.errors import CheckpointError
from dkdm_cli.models.io import load_state_strict


class ConsistencyObjective:
    """The consistency loss and its target network; one per run."""

    def __init__(self, diffusion: GaussianDiffusion, student: nn.Module, *, k: int,
                 target_rate: float, clip: bool, autocast: Callable[[], object]) -> None:
        self.diffusion, self.k, self.rate, self.clip = diffusion, k, target_rate, clip
        self.autocast = autocast
        self.target = copy.deepcopy(student).eval().requires_grad_(False)
        self._pairs: tuple[list, list] | None = None

    def __call__(self, res: StepResult, x: torch.Tensor, t: torch.Tensor,
                 y: torch.Tensor | None) -> Callable[[torch.Tensor], LossTerms]:
        """The loss of a batch whose teacher step is `res`, as a function of the student's
        output at (x, t, y)."""
        d = self.diffusion
        with torch.no_grad():
            x0_t, eps_t = res.step.pred_x0, res.step.eps  # the teacher's clipped x_0 and its eps
            tk = cm.neighbour_steps(t, self.k)  # (B,) CLEAN below step 0
            tk_in = tk.clamp(min=0)
            ck = d.coefs(tk_in, x)
            xk = cm.renoise(x0_t, eps_t, ck)  # (B, C, H, W): the teacher's ODE neighbour
            with self.autocast():
                out_k = self.target(xk, d.model_timesteps(tk_in), *(() if y is None else (y,)))
            f_k = cm.consistency_value(d, out_k.float(), x_t=xk, coefs=ck, clip=self.clip)
            target = torch.where((tk == cm.CLEAN).reshape(-1, *([1] * (x.dim() - 1))), x0_t, f_k)
            weight = res.step.coefs.alphas_cumprod.reshape(-1)  # (B,)

        def terms(student_out: torch.Tensor) -> LossTerms:
            f_s = cm.consistency_value(d, student_out.float(), x_t=x, coefs=res.step.coefs,
                                       clip=self.clip, straight_through=True)
            dist = mean_flat((f_s - target) ** 2)  # (B,)
            per_sample = weight * dist
            return LossTerms(loss=per_sample.mean(), per_sample=per_sample, mse=dist, kl=None)

        return terms

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        """target <- rate * target + (1 - rate) * student (one fused kernel)."""
        if self._pairs is None:
            self._pairs = (list(self.target.parameters()), [p.detach() for p in student.parameters()])
        torch._foreach_lerp_(self._pairs[0], self._pairs[1], 1.0 - self.rate)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The target network for checkpoints (a resumed run continues bit-exactly)."""
        return {f"target/{k}": v for k, v in self.target.state_dict().items()}

    def restore(self, ckpt) -> None:
        """Load the target network from a checkpoint written by this objective."""
        group = ckpt.group("target")
        if not group:
            raise CheckpointError(f"{ckpt.path}: no consistency target network in the checkpoint "
                                  "(was the run started with another objective?)")
        load_state_strict(self.target, group, source=str(ckpt.path))

