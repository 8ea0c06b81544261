"""Checkpoints written beside the loop: what is written is the state at submit time, a failed
write surfaces as one line in the loop, and a run with background saves resumes bit-exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_distill_args

from dkdm_cli.checkpoint import read_checkpoint
from dkdm_cli.distill import saver
from dkdm_cli.distill.saver import CheckpointWriter
from dkdm_cli.errors import StorageError


def test_background_write_is_the_state_at_submit_time(tmp_path):
    x = torch.zeros(1000)
    writer = CheckpointWriter(background=True)
    writer.submit(tmp_path / "ckpt-00000001.safetensors", {"pool/x": x}, {"step": 1})
    x.fill_(7.0)  # the next iteration changes the pool in place while the file is written
    writer.wait()
    ckpt = read_checkpoint(tmp_path / "ckpt-00000001.safetensors")
    assert ckpt.step == 1 and float(ckpt.tensors["pool/x"].abs().max()) == 0.0


def test_a_failed_background_write_is_raised_at_the_next_wait(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise StorageError("no space left on the device")

    monkeypatch.setattr(saver, "save_checkpoint", full)
    writer = CheckpointWriter(background=True)
    writer.submit(tmp_path / "a.safetensors", {"x": torch.zeros(3)}, {"step": 1})
    with pytest.raises(StorageError, match="no space"):
        writer.wait()
    writer.wait()  # reported once


def test_background_saves_resume_bit_exactly(tiny_teacher_file, tmp_path, monkeypatch):
    """The accelerator path (background saves), forced on the CPU: 6 straight iterations equal
    3 + resume + 3."""
    from dkdm_cli import precision
    from dkdm_cli.cli import run

    real = precision.distill_policy
    monkeypatch.setattr("dkdm_cli.distill.engine.distill_policy",
                        lambda d, device: dataclasses.replace(real(d, device), background_saves=True))
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(tiny_distill_args(tiny_teacher_file, straight, iterations=6)) == 0
    assert run(tiny_distill_args(tiny_teacher_file, split, iterations=3)) == 0
    assert run(tiny_distill_args(tiny_teacher_file, split, iterations=6)) == 0
    a = read_checkpoint(straight / "checkpoints" / "ckpt-00000006.safetensors").tensors
    b = read_checkpoint(split / "checkpoints" / "ckpt-00000006.safetensors").tensors
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
