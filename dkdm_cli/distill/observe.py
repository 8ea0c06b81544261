"""Observability of a run: progress bar, --json lines, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dkdm_cli import _console


class MetricWindow:
    """Sums of per-iteration metrics kept on the device; read (one sync) at log time.

    Float32 sums (float64 is slow or missing on GPUs, and a window is at most thousands of
    values); the iteration count is a Python int, so adding never reads the device."""

    def __init__(self, device: torch.device, num_timesteps: int) -> None:
        self.device, self.T = device, num_timesteps
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        # sums (12,): loss, mse, kl, grad norm, then per-sample loss and count per quarter of t
        self.sums = torch.zeros(12, device=self.device)
        self.iterations, self.has_kl = 0, False
        self.started = time.perf_counter()

    def add(self, *, loss, mse, kl, per_sample, t, grad_norm) -> None:
        """Accumulate one iteration (tensors stay on the device)."""
        s = self.sums
        s[0] += loss.detach()
        s[1] += mse.detach().mean()
        if kl is not None:
            s[2] += kl.detach().mean()
            self.has_kl = True
        s[3] += grad_norm.detach()
        quarter = (t * 4 // self.T).clamp(max=3)  # (B,) which quarter of 0..T-1 each true t is in
        per_sample = per_sample.detach().float()
        s[4:8].index_add_(0, quarter, per_sample)
        s[8:12].index_add_(0, quarter, torch.ones_like(per_sample))
        self.iterations += 1

    def summary(self, reduce_sum=None) -> dict[str, Any]:
        """Means over the window (one device sync). `reduce_sum` sums a tensor over ranks, so
        a multi-process job reports the means over every rank's samples."""
        packed = torch.cat([self.sums, torch.full((1,), float(self.iterations),
                                                  device=self.device)])  # (13,)
        if reduce_sum is not None:
            packed = reduce_sum(packed)
        vals = packed.cpu().tolist()
        n = max(1.0, vals[12])
        out = {"loss": vals[0] / n, "mse": vals[1] / n, "kl": vals[2] / n if self.has_kl else None,
               "grad_norm": vals[3] / n}
        for i in range(4):
            count = vals[8 + i]
            out[f"loss_t_q{i + 1}"] = vals[4 + i] / count if count else None
        return out


class Observer:
    """Everything a run reports. Only the main rank writes; `quiet` silences the bar."""

    def __init__(self, run_dir: Path, *, is_main: bool, quiet: bool, json_out: bool,
                 tensorboard: bool) -> None:
        self.run_dir, self.is_main, self.json_out = Path(run_dir), is_main, json_out
        self.show = is_main and not quiet and not json_out
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=_console.err, disable=not self.show, refresh_per_second=4,
        )
        self.task = None
        self.writer = None
        if tensorboard and is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                _console.warn("tensorboard is not installed (pip install tensorboard); not logging to it")
            else:
                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def __enter__(self) -> Observer:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
        if self.writer is not None:
            self.writer.close()

    def phase(self, description: str, total: int, completed: int = 0) -> None:
        """Start a new progress phase (start-up, distillation)."""
        if self.task is not None:
            self.progress.update(self.task, visible=False)
        self.task = self.progress.add_task(description, total=total, completed=completed, status="")

    def advance(self, n: int = 1, status: str | None = None) -> None:
        """Advance the current phase."""
        if self.task is not None:
            kw = {"status": status} if status is not None else {}
            self.progress.update(self.task, advance=n, **kw)

    def message(self, text: str) -> None:
        """A line for humans (stderr): main rank only, not with --quiet or --json."""
        if self.show:
            self.progress.console.print(text, highlight=False)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record: metrics.jsonl, --json stdout, TensorBoard, bar status."""
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.json_out:
            _console.print_json(record)
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])
        status = (f"loss {record['loss']:.4g}  {record['it_per_s']:.2f} it/s  "
                  f"{record['images_per_s']:.0f} img/s")
        self.advance(0, status=status)
