"""dkdm's UNet, DiT and reverse process behind diffusers' component contracts.

`DKDMUNet` and `DKDMDiT` ARE dkdm's networks (subclasses: the same modules, parameter names and
maths) with diffusers' model interface: ModelMixin + ConfigMixin, a config.json of constructor
arguments, and `forward(sample, timestep[, class_labels])` returning an output with `.sample`.
`DKDMScheduler` is dkdm's GaussianDiffusion and respacing (the code `dkdm sample` runs) as a
diffusers scheduler: `set_timesteps`, then one `step` per model call.

standalone.py copies these classes' source, with the dkdm code they build on, into an exported
folder, so everything here may only name what that shipped code defines: dkdm's model and
diffusion classes, torch, numpy and diffusers. No dkdm_cli import is used inside a class body.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from dkdm_cli.diffusion.consistency import (
    SAMPLING_STEPS,
    consistency_value,
    default_top,
    ladder,
    renoise,
)
from dkdm_cli.diffusion.gaussian import GaussianDiffusion, Prediction, VarianceType
from dkdm_cli.diffusion.samplers import Sampler, sampling_process
from dkdm_cli.diffusion.schedules import make_betas
from dkdm_cli.models.dit import DiT
from dkdm_cli.models.unet import UNet


@dataclass
class DKDMModelOutput(BaseOutput):
    """What the model components return, as diffusers' UNet2DModel does."""

    sample: torch.Tensor  # (B, C or 2C, H, W): the raw prediction (and variance channels)


def _batch_timesteps(timestep, sample: torch.Tensor) -> torch.Tensor:
    """`timestep` as (B,) on the sample's device: pipelines pass a scalar, dkdm a batch."""
    t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
    t = t.to(sample.device)
    return t.expand(sample.shape[0]) if t.dim() == 0 else t


class DKDMUNet(UNet, ModelMixin, ConfigMixin):
    """dkdm's ADM UNet as a diffusers model (config: UNet's constructor arguments, with
    diffusers' `sample_size` for `image_size`). UNet comes first in the bases so that its
    modules are found by nn.Module's attribute lookup, not by ConfigMixin's."""

    @register_to_config
    def __init__(
        self, *, sample_size: int, in_channels: int, model_channels: int, out_channels: int,
        num_res_blocks: int, attention_resolutions: tuple[int, ...] = (), dropout: float = 0.0,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2), num_heads: int = 4,
        num_head_channels: int = -1, use_scale_shift_norm: bool = True,
        resblock_updown: bool = False, conv_resample: bool = True, num_classes: int = 0,
        class_null: bool = False,
    ) -> None:
        super().__init__(
            image_size=sample_size, in_channels=in_channels, model_channels=model_channels,
            out_channels=out_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(attention_resolutions), dropout=dropout,
            channel_mult=tuple(channel_mult), num_heads=num_heads,
            num_head_channels=num_head_channels, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, conv_resample=conv_resample, num_classes=num_classes,
            class_null=class_null)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        """sample (B, C, H, W) at integer steps `timestep` (B,) or a scalar (and labels (B,))
        -> `.sample` (B, C or 2C, H, W)."""
        out = UNet.forward(self, sample, _batch_timesteps(timestep, sample), class_labels)
        return DKDMModelOutput(sample=out) if return_dict else (out,)


class DKDMDiT(DiT, ModelMixin, ConfigMixin):
    """dkdm's DiT as a diffusers model (config: DiT's constructor arguments, with `sample_size`
    for `image_size`)."""

    @register_to_config
    def __init__(
        self, *, sample_size: int, in_channels: int, out_channels: int, patch_size: int,
        hidden_size: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
        frequency_embedding_size: int = 256, num_classes: int = 0, class_null: bool = False,
    ) -> None:
        super().__init__(
            image_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, frequency_embedding_size=frequency_embedding_size,
            num_classes=num_classes, class_null=class_null)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        """As DKDMUNet.forward."""
        out = DiT.forward(self, sample, _batch_timesteps(timestep, sample), class_labels)
        return DKDMModelOutput(sample=out) if return_dict else (out,)


@dataclass
class DKDMSchedulerOutput(BaseOutput):
    """One reverse step, named as diffusers' schedulers name it."""

    prev_sample: torch.Tensor  # x_{t-1} (B, C, H, W)
    pred_original_sample: torch.Tensor  # x_0 predicted at this step (clipped where configured)


# diffusers' beta_schedule names -> dkdm's schedules (the same formulas).
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "squaredcos_cap_v2": "cosine"}


class DKDMScheduler(SchedulerMixin, ConfigMixin):
    """dkdm's reverse process as a diffusers scheduler.

    The config uses DDPMScheduler's key names (num_train_timesteps, beta_schedule, beta_start,
    beta_end, trained_betas, prediction_type, variance_type, clip_sample), so other schedulers
    can be built `from_config` it, plus `sampler` ("iddpm": respaced ancestral steps; "ddim";
    "consistency": a few-step student's multistep consistency sampling, from step `top`) and
    `eta` (DDIM). `set_timesteps(n)` respaces the process as `dkdm sample --steps n` does (for
    consistency: the n-step ladder); `step` draws its noise z from `generator` as dkdm's sampler
    does (iddpm and ddim: on every call, also at t = 0 and for DDIM at eta 0; consistency:
    between rungs), so the same generator gives `dkdm sample`'s images.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
        beta_start: float = 0.0001, beta_end: float = 0.02, trained_betas: list | None = None,
        prediction_type: str = "epsilon", variance_type: str = "fixed_small",
        clip_sample: bool = True, sampler: str = "iddpm", eta: float = 0.0,
        top: int | None = None,
    ) -> None:
        if trained_betas is not None:
            betas = make_betas("explicit", num_train_timesteps, betas=trained_betas)
        elif beta_schedule in BETA_SCHEDULES:
            betas = make_betas(BETA_SCHEDULES[beta_schedule], num_train_timesteps,
                               beta_start=beta_start, beta_end=beta_end)
        else:
            raise ValueError(f"beta_schedule {beta_schedule!r}: expected one of "
                             f"{', '.join(BETA_SCHEDULES)}, or trained_betas")
        self.diffusion = GaussianDiffusion(betas, prediction=Prediction(prediction_type),
                                           variance=VarianceType(variance_type))
        self.sampler = Sampler(sampler)
        self.init_noise_sigma = 1.0
        self.set_timesteps(None)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def default_inference_steps(self) -> int:
        """The steps the pipeline takes when none are given: the model's own (few-step: 4)."""
        return SAMPLING_STEPS if self.sampler is Sampler.CONSISTENCY else 50

    def set_timesteps(self, num_inference_steps: int | None = None, device=None) -> None:
        """Respace to `num_inference_steps` steps (None: all T; consistency: its default); the
        `timesteps` are then the original steps the model is called at, from the top down."""
        if self.sampler is Sampler.CONSISTENCY:
            top = self.config.top
            top = default_top(self.diffusion.num_timesteps) if top is None else int(top)
            self._rungs = ladder(num_inference_steps or self.default_inference_steps, top=top)
            self.num_inference_steps = len(self._rungs)
            self.timesteps = torch.tensor(self._rungs, dtype=torch.long, device=device)
            return
        self.process = sampling_process(self.diffusion, num_inference_steps, self.sampler)
        self.num_inference_steps = self.process.num_timesteps
        steps = self.process.timestep_map  # (n,) original timesteps, ascending
        self._index = {int(s): i for i, s in enumerate(steps.tolist())}
        self.timesteps = steps.flip(0).to(device)  # (n,)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """x_{t-1} from the model's output at original step `timestep` for x_t = `sample`."""
        if self.sampler is Sampler.CONSISTENCY:
            return self._consistency_step(model_output, int(timestep), sample, generator, return_dict)
        i = self._index.get(int(timestep))
        if i is None:
            raise ValueError(f"timestep {int(timestep)} is not one of this schedule's steps; "
                             "call set_timesteps first and use its timesteps")
        t = torch.full((sample.shape[0],), i, device=sample.device, dtype=torch.long)  # (B,)
        step = self.process.p_mean_variance(model_output.to(sample.dtype), x_t=sample, t=t,
                                            clip_denoised=self.config.clip_sample)
        where = generator.device if generator is not None else sample.device
        z = torch.randn(sample.shape, generator=generator, device=where,
                        dtype=sample.dtype).to(sample.device)  # (B, C, H, W)
        if self.sampler is Sampler.DDIM:
            prev = self.process.ddim_step(step, x_t=sample, t=t, noise=z, eta=self.config.eta)
        else:
            prev = self.process.ancestral_step(step, x_t=sample, t=t, noise=z)
        if not return_dict:
            return (prev, step.pred_x0)
        return DKDMSchedulerOutput(prev_sample=prev, pred_original_sample=step.pred_x0)

    def _consistency_step(self, model_output, timestep: int, sample, generator, return_dict):
        """x_0 = f(x_t, t); re-noised with fresh noise to the next rung (the last rung: x_0)."""
        if timestep not in self._rungs:
            raise ValueError(f"timestep {timestep} is not one of this ladder's steps; call "
                             "set_timesteps first and use its timesteps")
        t = torch.full((sample.shape[0],), timestep, device=sample.device, dtype=torch.long)
        x0 = consistency_value(self.diffusion, model_output.to(sample.dtype), x_t=sample,
                               coefs=self.diffusion.coefs(t, sample), clip=self.config.clip_sample)
        prev = x0
        i = self._rungs.index(timestep)
        if i + 1 < len(self._rungs):
            s = torch.full_like(t, self._rungs[i + 1])
            where = generator.device if generator is not None else sample.device
            z = torch.randn(sample.shape, generator=generator, device=where,
                            dtype=sample.dtype).to(sample.device)  # (B, C, H, W)
            prev = renoise(x0, z, self.diffusion.coefs(s, sample))
        if not return_dict:
            return (prev, x0)
        return DKDMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
