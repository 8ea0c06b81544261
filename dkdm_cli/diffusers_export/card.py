"""The parts of a diffusers export's model card that only it has (export.model_card writes the
rest): the hub's YAML front matter, how to sample with diffusers, how to reproduce `dkdm
sample` exactly, and how to publish with the hub's own CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def front_matter(origin: str, *, num_classes: int) -> str:
    """The hub's metadata block: library, tags, the teacher's license and hub repo where known
    (`origin`: the first teacher of the chain)."""
    from dkdm_cli.teachers.registry import TEACHERS

    task = "class-conditional-image-generation" if num_classes else "unconditional-image-generation"
    lines = ["---", "library_name: diffusers", "tags:", "- dkdm", "- knowledge-distillation",
             "- data-free", f"- {task}"]
    entry = TEACHERS.create(origin) if origin in TEACHERS else None
    if entry is not None and entry.license and " " not in entry.license:
        lines.append(f"license: {entry.license}")  # an SPDX id the hub understands
    hub = entry.source if entry is not None else origin
    if hub.startswith("hf:"):
        lines.append(f"base_model: {hub[3:]}")
    return "\n".join([*lines, "---", ""]) + "\n"


def diffusers_use(out: Path, extra: dict[str, Any], *, num_classes: int) -> str:
    """The card's usage section for a diffusers folder."""
    c, h, w = extra["sample_shape"]
    labels = (f"\n# class-conditional ({num_classes} classes): class_labels=[3] * 16, and with a "
              "null class guidance_scale=2.0" if num_classes else "")
    return f'''```python
import torch
from diffusers import DiffusionPipeline

# Needs torch, diffusers and timm (not dkdm). trust_remote_code runs the folder's own
# dkdm_models.py, scheduling_dkdm.py and pipeline_dkdm.py: read them first.
pipe = DiffusionPipeline.from_pretrained("{out.name}", trust_remote_code=True)
images = pipe(batch_size=16, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images
images[0].save("sample.png"){labels}
```

The same images as `dkdm sample --model {out.name} --num 16 --seed 0 --steps 50`: dkdm draws x_T
on the CPU from the seed and each step's noise from seed + 1, so

```python
latents = torch.randn((16, {c}, {h}, {w}), generator=torch.Generator().manual_seed(0))
out = pipe(latents=latents, generator=torch.Generator().manual_seed(1), output_type="np")
```

(`output_type="np"`: floats in [0, 1], NHWC). DDIM: `pipe.scheduler = type(pipe.scheduler)
.from_config(pipe.scheduler.config, sampler="ddim")`.

With dkdm, the folder is a model and a teacher: `dkdm sample --model {out.name} ...`,
`dkdm distill --teacher {out.name} ...`.

## Publish

With the hub's own CLI (huggingface_hub): `hf auth login`, then
`hf upload YOUR-NAME/{out.name} {out.name}`. Load it with
`DiffusionPipeline.from_pretrained("YOUR-NAME/{out.name}", trust_remote_code=True)`.'''
