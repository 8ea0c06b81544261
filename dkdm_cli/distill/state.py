"""The trainable state of a run (student, EMA, optimizer, pool, RNG) and its checkpoint form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dkdm_cli.checkpoint import Checkpoint, optimizer_tensors, restore_optimizer
from dkdm_cli.distill.ema import EMA
from dkdm_cli.distill.pool import LabelPlan, StatePool
from dkdm_cli.errors import CheckpointError
from dkdm_cli.models.io import load_state_strict


@dataclass
class TrainState:
    """Everything that changes while training."""

    student: nn.Module  # the unwrapped module (never a DDP or compiled wrapper)
    ema: EMA
    opt: torch.optim.Optimizer
    step: int = 0

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, doc fields) for a checkpoint (the batch source adds its own tensors)."""
        self.ema.copy_buffers(self.student)
        tensors = {f"student/{k}": v for k, v in self.student.state_dict().items()}
        tensors.update({f"ema/{k}": v for k, v in self.ema.shadow.state_dict().items()})
        opt_tensors, groups = optimizer_tensors(self.opt)
        tensors.update(opt_tensors)
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda{i}"] = s
        doc = {"step": self.step, "optim_param_groups": groups,
               "ema_num_updates": self.ema.num_updates}
        return tensors, doc

    def restore(self, ckpt: Checkpoint) -> None:
        """Load student, EMA, optimizer, step and global RNG states from a checkpoint."""
        load_state_strict(self.student, ckpt.group("student"), source=str(ckpt.path))
        load_state_strict(self.ema.shadow, ckpt.group("ema"), source=str(ckpt.path))
        self.ema.num_updates = int(ckpt.doc["ema_num_updates"])
        restore_optimizer(self.opt, ckpt)
        self.step = ckpt.step
        rng = ckpt.group("rng")
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available():
            states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
            if states:
                torch.cuda.set_rng_state_all(states)


def student_settings(teacher_settings):
    """The diffusion settings a student runs with: the teacher's, called on plain timesteps."""
    return dataclasses.replace(teacher_settings, timestep_scale=1.0)


def pool_from_checkpoint(ckpt: Checkpoint, *, num_timesteps: int, size: int, device: torch.device,
                         generator: torch.Generator, labels: LabelPlan | None = None) -> StatePool | None:
    """The stored pool (with its labels, for a conditional teacher) and its generator stream, or
    None when the checkpoint has no pool."""
    if "pool/x" not in ckpt.tensors:
        return None
    x, t = ckpt.tensors["pool/x"], ckpt.tensors["pool/t"]
    if x.shape[0] != size:
        raise CheckpointError(f"{ckpt.path}: stored pool has {x.shape[0]} states, this run needs {size}")
    y = ckpt.tensors.get("pool/y")
    if (y is None) != (labels is None):
        raise CheckpointError(f"{ckpt.path}: the stored pool {'has no' if y is None else 'has'} class "
                              f"labels but the teacher is {'' if labels else 'un'}conditional")
    generator.set_state(ckpt.tensors["rng/pool"])
    return StatePool(x.to(device), t.to(device), num_timesteps=num_timesteps, generator=generator,
                     y=None if y is None else y.to(device), labels=labels)
