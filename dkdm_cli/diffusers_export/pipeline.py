"""The diffusers pipeline shipped with an exported student (`pipeline_dkdm.py` in the folder).

`DKDMPipeline.__call__` takes DDPMPipeline's arguments (batch_size, generator,
num_inference_steps, output_type, return_dict) plus DiTPipeline's class_labels and
guidance_scale, and `latents` (x_T) as most diffusers pipelines do. It runs the loop of dkdm's
`sample()` with the folder's DKDMScheduler and applies classifier-free guidance with dkdm's own
rule (`guide`, copied in with this class by standalone.py), so given `dkdm sample`'s x_T and
step generator it makes `dkdm sample`'s images.

Like components.py, the class names only what the shipped file defines (`guide`) and diffusers.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from dkdm_cli.diffusion.guidance import guide


class DKDMPipeline(DiffusionPipeline):
    """Samples a DKDM student (a UNet in `unet`, or a DiT in `transformer`) with its scheduler;
    a latent student decodes through `vae` at `vae.config.scaling_factor` (and shift_factor).

    To reproduce `dkdm sample --seed S --num N` (one batch): latents = torch.randn((N, C, H, W),
    generator=torch.Generator().manual_seed(S)) and generator =
    torch.Generator(device).manual_seed(S + 1).
    """

    _optional_components = ["unet", "transformer", "vae"]

    def __init__(self, scheduler, unet=None, transformer=None, vae=None) -> None:
        super().__init__()
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer, vae=vae)

    @property
    def denoiser(self):
        """The network: `unet` or `transformer`, whichever the folder has."""
        net = self.unet if self.unet is not None else self.transformer
        if net is None:
            raise ValueError("this pipeline has neither a unet nor a transformer")
        return net

    def _labels(self, class_labels, batch: int) -> tuple[torch.Tensor | None, bool]:
        """(labels (B,) or None, whether they are real classes): no labels on a conditional
        model means its null class, the unconditional branch."""
        config = self.denoiser.config
        classes = int(config.num_classes or 0)
        null = classes if config.class_null else None
        if not classes:
            if class_labels is not None:
                raise ValueError("this model is unconditional: it takes no class_labels")
            return None, False
        if class_labels is None:
            if null is None:
                raise ValueError(f"this model has no null class: give class_labels in 0..{classes - 1}")
            return torch.full((batch,), null, dtype=torch.long), False
        if isinstance(class_labels, int):
            class_labels = [class_labels] * batch
        y = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)  # (B,)
        top = classes if null is not None else classes - 1
        if bool(((y < 0) | (y > top)).any()):
            raise ValueError(f"class_labels must be in 0..{top}, got {y.tolist()}")
        return y, True

    def _predict(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                 scale: float) -> torch.Tensor:
        """The network's float32 output at step t for x (B, C, H, W): with labels y (B,), and
        guided at `scale` (one forward of 2B: labels, then the null class) when scale != 1."""
        net = self.denoiser
        tt = t.to(x.device).expand(x.shape[0])  # (B,)
        if y is None:
            return net(x.to(net.dtype), tt).sample.float()
        if scale == 1.0:
            return net(x.to(net.dtype), tt, y).sample.float()
        null = torch.full_like(y, int(net.config.num_classes))  # (B,)
        out = net(torch.cat([x, x]).to(net.dtype), torch.cat([tt, tt]),
                  torch.cat([y, null])).sample.float()  # (2B, C or 2C, H, W)
        cond, uncond = out.chunk(2)
        return guide(cond, uncond, scale=scale, channels=x.shape[1])

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples (B, C, H, W) to images in [-1, 1]: latents through the vae, pixels as they are."""
        if self.vae is None:
            return x
        scale = float(self.vae.config.scaling_factor)
        shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        z = x.to(self.vae.dtype) / scale + shift  # (B, c, h, w)
        return self.vae.decode(z).sample.clamp(-1.0, 1.0).float()

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | None = None,
                 num_inference_steps: int | None = None, output_type: str = "pil",
                 return_dict: bool = True,
                 class_labels=None, guidance_scale: float = 1.0,
                 latents: torch.Tensor | None = None):
        """`batch_size` images (class_labels: an int, or one label per image, which sets the
        batch size; guidance_scale: classifier-free guidance, 1 for none; latents: x_T;
        num_inference_steps: the model's own when None, 50, or 4 for a few-step student) ->
        `.images`: PIL images, or for output_type="np" floats in [0, 1], (B, H, W, C)."""
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type {output_type!r}: expected 'pil' or 'np'")
        net = self.denoiser
        if latents is not None:
            batch_size = latents.shape[0]
        elif class_labels is not None and not isinstance(class_labels, int):
            batch_size = len(class_labels)
        y, real = self._labels(class_labels, batch_size)
        if guidance_scale != 1.0 and real and not net.config.class_null:
            raise ValueError("this model has no null class, so guidance_scale must be 1")
        if guidance_scale != 1.0 and not net.config.num_classes:
            raise ValueError("this model is unconditional: guidance_scale must be 1")
        shape = (batch_size, net.config.in_channels, net.config.sample_size, net.config.sample_size)
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if tuple(latents.shape) != shape or (y is not None and len(y) != batch_size):
            raise ValueError(f"latents {tuple(latents.shape)} and class_labels must make a batch "
                             f"of {shape}")
        x = latents.to(device=device, dtype=torch.float32)  # x_T (B, C, H, W)
        y = None if y is None else y.to(device)
        steps = num_inference_steps or self.scheduler.default_inference_steps
        self.scheduler.set_timesteps(steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self._predict(x, t, y, guidance_scale if real else 1.0)
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        image = (self._decode(x).clamp(-1, 1) + 1) / 2  # (B, C, H, W) in [0, 1]
        image = image.permute(0, 2, 3, 1).cpu().float().numpy()  # (B, H, W, C)
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
