"""Promises about run directories: no lost work under mistakes, crashes, full disks, schedulers
and concurrent runs. Each test is one promise; its name says which."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_distill_args

from dkdm_cli.checkpoint import CONFIG_NAME, list_checkpoints, read_checkpoint
from dkdm_cli.cli import run
from dkdm_cli.distill.lock import LOCK_NAME, RunLock

POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and locks")


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory (but its lock) by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def _with(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag`'s value replaced (or the pair appended; --set always appends)."""
    out = list(args)
    if flag != "--set" and flag in out:
        out[out.index(flag) + 1] = value
        return out
    return out + [flag, value]


def _one_line(err: str) -> bool:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return len(lines) == 1 and "Traceback" not in err


@pytest.fixture
def trained(tiny_teacher_file, tmp_path):
    """A run directory with checkpoints at steps 3 and 6."""
    rd = tmp_path / "run"
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=6)) == 0
    return rd


# -- 1, 3: mistakes never cost a run, and never lock a run directory -----------------------------

@pytest.mark.parametrize("bad", [
    ["--student", "unet-tt"],
    ["--set", "student.kwargs={model_channels=7}"],
    ["--teacher", "no/such/teacher.safetensors"],
    ["--set", "distill.grid_every=1", "--set", "distill.grid_steps=500"],
])
def test_force_with_a_typo_changes_nothing(trained, tiny_teacher_file, bad, capsys):
    before = _snapshot(trained)
    args = tiny_distill_args(tiny_teacher_file, trained, iterations=6) + ["--force"]
    for flag, value in zip(bad[::2], bad[1::2], strict=True):
        args = _with(args, flag, value)
    code = run(args)
    err = capsys.readouterr().err
    assert code == 2 and _one_line(err), err
    assert _snapshot(trained) == before
    assert not list(trained.parent.glob("run.bak-*"))


def test_force_moves_the_old_run_aside_never_deletes(trained, tiny_teacher_file, capsys):
    before = _snapshot(trained)
    args = tiny_distill_args(tiny_teacher_file, trained, iterations=3, extra=["--lr", "0.01"])
    assert run(args) == 2  # a different configuration is refused without --force
    assert _snapshot(trained) == before
    capsys.readouterr()
    args = [a for a in args if a != "--quiet"]
    assert run(args + ["--force"]) == 0
    err = capsys.readouterr().err
    backup = trained.parent / "run.bak-1"
    assert str(backup) in err and "mv" in err
    assert _snapshot(backup) == before  # the whole old run, byte for byte
    assert read_checkpoint(list_checkpoints(trained)[-1]).doc["config"]["distill"]["lr"] == 0.01


@pytest.mark.parametrize("bad", [
    ["--student", "unet-tt"],
    ["--set", "student.kwargs={bogus=1}"],
    ["--teacher", "./missing.safetensors"],
])
def test_a_failed_first_try_leaves_the_run_directory_untouched(tiny_teacher_file, tmp_path, bad, capsys):
    rd = tmp_path / "run"
    args = tiny_distill_args(tiny_teacher_file, rd, iterations=3)
    assert run(_with(args, *bad)) == 2
    assert not rd.exists()
    capsys.readouterr()
    assert run(args) == 0  # the corrected command just works


def test_a_run_directory_without_checkpoints_never_blocks(tiny_teacher_file, tmp_path):
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / CONFIG_NAME).write_text("")  # what an old failed start on a full disk left behind
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=3)) == 0
    rd2 = tmp_path / "run2"
    rd2.mkdir()
    (rd2 / CONFIG_NAME).write_text("[distill]\nlr = 0.5\n")  # another config, nothing trained
    assert run(tiny_distill_args(tiny_teacher_file, rd2, iterations=3)) == 0


def test_unreadable_checkpoints_are_refused_then_moved_aside_with_force(trained, tiny_teacher_file,
                                                                        capsys):
    for path in list_checkpoints(trained):
        path.write_bytes(b"garbage")
    before = _snapshot(trained)
    args = tiny_distill_args(tiny_teacher_file, trained, iterations=3)
    assert run(args) == 2 and "--force" in capsys.readouterr().err
    assert _snapshot(trained) == before
    assert run(args + ["--force"]) == 0
    assert _snapshot(trained.parent / "run.bak-1") == before


# -- 2: nothing else writes over a run's checkpoints ----------------------------------------------

@pytest.mark.parametrize("argv", [
    ["export", "--run-dir", "{rd}", "--out", "{rd}/checkpoints/ckpt-00000006.safetensors"],
    ["export", "--run-dir", "{rd}", "--out", "{rd}/checkpoints/student.safetensors"],
    ["export", "--run-dir", "{rd}", "--out", "{copy}"],
    ["sample", "--model", "{rd}", "--num", "2", "--steps", "2", "--out", "{rd}/checkpoints"],
    ["sample", "--model", "{rd}", "--num", "2", "--steps", "2", "--grid", "{rd}/checkpoints/g.png"],
])
def test_export_and_sample_never_write_into_checkpoints(trained, tmp_path, argv, capsys):
    copy = tmp_path / "elsewhere" / "ckpt-00000006.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(list_checkpoints(trained)[-1].read_bytes())  # a checkpoint kept elsewhere
    before = _snapshot(trained)
    code = run([a.format(rd=trained, copy=copy) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and _one_line(err), err
    assert _snapshot(trained) == before
    assert copy.read_bytes() == list_checkpoints(trained)[-1].read_bytes()


# -- 4: full disks and broken file systems: one line, nothing lost ---------------------------------

def _enospc_on_fsync(monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("dkdm_cli._fs.os.fsync", full)


def test_full_disk_on_a_first_start_leaves_no_config_behind(tiny_teacher_file, tmp_path,
                                                            monkeypatch, capsys):
    rd = tmp_path / "run"
    _enospc_on_fsync(monkeypatch)
    code = run(tiny_distill_args(tiny_teacher_file, rd, iterations=3))
    err = capsys.readouterr().err
    assert code == 1 and _one_line(err) and "no space left" in err, err
    assert [p.name for p in rd.iterdir()] in ([], [LOCK_NAME])  # no 0-byte config, no temp file
    monkeypatch.undo()
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=3)) == 0


def test_safetensors_full_disk_error_is_one_line(trained, tiny_teacher_file, monkeypatch, capsys):
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # what safetensors really raises (seen on a full tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    before = list_checkpoints(trained)[-1].read_bytes()
    monkeypatch.setattr("dkdm_cli.models.io.save_file", full)
    code = run(tiny_distill_args(tiny_teacher_file, trained, iterations=9))
    err = capsys.readouterr().err
    assert code == 1 and _one_line(err) and "no space left" in err, err
    assert list_checkpoints(trained)[-1].read_bytes() == before


@pytest.mark.parametrize("argv", [
    ["sample", "--model", "{rd}", "--num", "2", "--steps", "2", "--out", "{out}/pngs"],
    ["sample", "--model", "{rd}", "--num", "2", "--steps", "2", "--npz", "{out}/s.npz"],
    ["export", "--run-dir", "{rd}", "--out", "{out}/student.safetensors"],
])
def test_sample_and_export_on_a_full_disk_say_so_in_one_line(trained, tmp_path, monkeypatch,
                                                             capsys, argv):
    _enospc_on_fsync(monkeypatch)
    code = run([a.format(rd=trained, out=tmp_path / "out") for a in argv])
    err = capsys.readouterr().err
    assert code == 1 and _one_line(err) and "no space left" in err, err


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@POSIX
@pytest.mark.slow
def test_a_real_full_disk_keeps_the_previous_checkpoint(tiny_teacher_file, tmp_path, capsys):
    keep = ["--set", "distill.keep_last=100"]
    probe = tmp_path / "probe"
    assert run(tiny_distill_args(tiny_teacher_file, probe, iterations=3, extra=keep)) == 0
    size = list_checkpoints(probe)[-1].stat().st_size  # room for two checkpoints, not three
    with _tmpfs(tmp_path / "small", f"size={(5 * size) // 2 // 1024 + 8}k") as disk:
        rd = disk / "run"
        assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=3, extra=keep)) == 0
        before = list_checkpoints(rd)[-1].read_bytes()
        code = run(tiny_distill_args(tiny_teacher_file, rd, iterations=300, extra=keep))
        err = capsys.readouterr().err
        assert code == 1 and _one_line(err) and "no space left" in err, err
        assert read_checkpoint(list_checkpoints(rd)[0]).step == 3
        assert list_checkpoints(rd)[0].read_bytes() == before
        assert not [p for p in (rd / "checkpoints").iterdir() if p.name.endswith(".tmp")]


@POSIX
def test_a_read_only_file_system_is_one_line(tiny_teacher_file, tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as disk:
        code = run(tiny_distill_args(tiny_teacher_file, disk / "run", iterations=3))
        err = capsys.readouterr().err
        assert code == 2 and _one_line(err) and "read-only" in err, err


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may create files in: a read-only tmpfs (root), else mode 0555."""
    folder = tmp_path / "ro"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with _tmpfs(folder, "ro,size=64k") as disk:
        yield disk


@POSIX
@pytest.mark.parametrize("argv,target", [
    (["sample", "--model", "{rd}", "--num", "2", "--steps", "2", "--npz", "{ro}/x.npz"], "x.npz"),
    (["sample", "--model", "{rd}", "--num", "2", "--steps", "2", "--out", "{ro}/pngs"], "pngs"),
    (["sample", "--model", "{rd}", "--num", "2", "--steps", "2", "--out", "{ro}"], ""),
    (["export", "--run-dir", "{rd}", "--out", "{ro}/x.safetensors"], "x.safetensors"),
])
def test_unwritable_outputs_are_refused_before_any_work_naming_the_path(trained, read_only_dir,
                                                                        monkeypatch, capsys, argv,
                                                                        target):
    def no_work(*args, **kwargs):
        raise AssertionError("sampled or exported before checking the output path")

    monkeypatch.setattr("dkdm_cli.commands.sample.generate", no_work)
    monkeypatch.setattr("dkdm_cli.export.student_from_checkpoint", no_work)
    code = run([a.format(rd=trained, ro=read_only_dir) for a in argv])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and _one_line(err), err
    assert str(read_only_dir / target).rstrip("/") in err and ".tmp" not in err, err
    assert ("read-only" if os.geteuid() == 0 else "permission denied") in err


@POSIX
def test_a_failed_temp_file_names_the_target_not_the_temp_file(read_only_dir):
    from dkdm_cli import _fs

    with pytest.raises(OSError) as info:
        _fs.write_bytes(read_only_dir / "x.npz", b"data")
    assert info.value.filename == str(read_only_dir / "x.npz")


def test_paths_under_a_file_are_one_line(tiny_teacher_file, trained, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [
        tiny_distill_args(tiny_teacher_file, blocker / "run", iterations=3),
        tiny_distill_args(tiny_teacher_file, blocker, iterations=3),
        ["sample", "--model", str(trained), "--num", "2", "--steps", "2", "--out", str(blocker)],
        ["sample", "--model", str(trained), "--num", "2", "--steps", "2", "--grid", str(tmp_path)],
    ]
    for argv in cases:
        code = run(argv)
        err = capsys.readouterr().err
        assert code == 2 and _one_line(err), (argv, err)


def test_eval_of_unreadable_images_is_one_line(tmp_path, inception_weights, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"not a png")
    code = run(["eval", str(folder), "--isc", "--inception-weights", str(inception_weights)])
    err = capsys.readouterr().err
    assert code == 2 and _one_line(err) and "not a readable image" in err, err


def test_eval_of_a_missing_input_writes_no_cache(tmp_path, inception_weights, monkeypatch, capsys):
    cache = tmp_path / "dkdm-cache"
    monkeypatch.setenv("DKDM_CACHE_DIR", str(cache))
    code = run(["eval", str(tmp_path / "nope.npz"), "--fid", "--inception-weights",
                str(inception_weights)])
    assert code == 2 and _one_line(capsys.readouterr().err)
    assert not cache.exists() or not any(cache.rglob("*"))


# -- 5: one distill per run directory ----------------------------------------------------------

@POSIX
def test_a_busy_run_directory_is_refused_naming_the_pid(trained, tiny_teacher_file, capsys):
    before = _snapshot(trained)
    with RunLock(trained):
        code = run(tiny_distill_args(tiny_teacher_file, trained, iterations=9, extra=["--force"]))
    err = capsys.readouterr().err
    assert code == 2 and _one_line(err) and f"PID {os.getpid()}" in err, err
    assert _snapshot(trained) == before


@POSIX
def test_a_stale_lock_never_blocks(trained, tiny_teacher_file):
    (trained / LOCK_NAME).write_text("999999\n")  # a killed process's PID, no lock held
    assert run(tiny_distill_args(tiny_teacher_file, trained, iterations=9)) == 0


# -- 6: schedulers' signals save the run --------------------------------------------------------

@POSIX
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_at_the_next_iteration_and_exits_143(tiny_teacher_file, tmp_path,
                                                                 monkeypatch, signum):
    from dkdm_cli.distill.engine import Distiller

    original = Distiller.iteration

    def iteration(self, window):
        loss = original(self, window)
        if self.state.step == 2:
            os.kill(os.getpid(), signum)  # as SLURM or Kubernetes would
        return loss

    monkeypatch.setattr(Distiller, "iteration", iteration)
    rd = tmp_path / "run"
    args = tiny_distill_args(tiny_teacher_file, rd, iterations=100,
                             extra=["--set", "distill.save_every=1000"])
    assert run(args) == 143
    assert read_checkpoint(list_checkpoints(rd)[-1]).step == 2
    monkeypatch.undo()
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=4,
                                 extra=["--set", "distill.save_every=1000"])) == 0


@POSIX
@pytest.mark.parametrize("extra", [
    ["--set", "distill.init=\"exact\""],
    ["--set", "distill.init=\"fast\"", "--set", "distill.init_steps=8"],
    ["--mode", "synthetic", "--set", "distill.synthetic_samples=4", "--set",
     "distill.synthetic_steps=10"],
])
def test_a_stop_signal_during_the_startup_exits_143_at_the_next_teacher_step(tiny_teacher_file,
                                                                            tmp_path, monkeypatch,
                                                                            capsys, extra):
    from dkdm_cli.distill.observe import Observer

    ticks = []
    original = Observer.advance

    def advance(self, n=1, status=None):
        ticks.append(n)
        if len(ticks) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as Kubernetes would, mid start-up
        return original(self, n, status=status)

    monkeypatch.setattr(Observer, "advance", advance)
    rd = tmp_path / "run"
    args = tiny_distill_args(tiny_teacher_file, rd, iterations=3, extra=extra)
    assert run([a for a in args if a != "--quiet"]) == 143
    assert len(ticks) == 2  # not one teacher step more (the start-up has 8 or more)
    assert not list_checkpoints(rd) and not (rd / "startup.json").exists()
    assert "during the start-up" in capsys.readouterr().err
    monkeypatch.undo()
    assert run(args) == 0  # the start-up is built again and the run goes on
    assert read_checkpoint(list_checkpoints(rd)[-1]).step == 3


@POSIX
def test_a_second_signal_aborts_at_once():
    from dkdm_cli.distill.signals import StopFlag
    from dkdm_cli.errors import Interrupted

    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.exit_code == 143 and stop.name == "SIGTERM"
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.exit_code == 143


@POSIX
@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signalled_subprocess_saves_and_exits(tiny_teacher_file, tmp_path, signum, code):
    rd = tmp_path / "run"
    args = tiny_distill_args(tiny_teacher_file, rd, iterations=100000)
    args = [a if a != "--quiet" else "--json" for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dkdm_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(rd):
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    end = json.loads(out.splitlines()[-1])
    assert end["status"] == "interrupted" and end["signal"] == signal.Signals(signum).name
    assert read_checkpoint(list_checkpoints(rd)[-1]).step == end["step"]


# -- 8: the smaller promises ---------------------------------------------------------------------

def test_leftovers_of_a_killed_save_are_removed_on_the_next_start(trained, tiny_teacher_file):
    leftover = trained / "checkpoints" / ".ckpt-00000009.safetensors.a1b2c3d4.tmp"
    leftover.write_bytes(b"x" * 1000)
    user_file = trained / "checkpoints" / "notes.tmp"  # not ours: kept
    user_file.write_text("mine")
    assert run(tiny_distill_args(tiny_teacher_file, trained, iterations=9)) == 0
    assert not leftover.exists() and user_file.exists()


def test_metrics_hold_each_step_once_after_a_resume(trained, tiny_teacher_file):
    # As after kill -9 between logging step 6 and saving it: the newest checkpoint is 3.
    list_checkpoints(trained)[-1].unlink()
    with open(trained / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "loss": 1.0}\n{"step": 8, "lo')  # a line cut short
    assert run(tiny_distill_args(tiny_teacher_file, trained, iterations=8)) == 0
    steps = [json.loads(ln)["step"] for ln in (trained / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_damaged_metrics_lines_are_dropped_with_a_warning_and_the_run_resumes(trained,
                                                                            tiny_teacher_file, capsys):
    list_checkpoints(trained)[-1].unlink()  # resume from step 3
    path = trained / "metrics.jsonl"
    good = [json.loads(ln) for ln in path.read_text().splitlines()]
    with open(path, "a") as fh:
        fh.write('{"step": "abc"}\n{"step": null}\n[1, 2]\n\xff\n{"step": 7, "lo')
    assert run(tiny_distill_args(tiny_teacher_file, trained, iterations=8)) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "metrics.jsonl" in err and "unreadable" in err, err
    records = [json.loads(ln) for ln in path.read_text().splitlines()]  # every line readable
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == 8
    assert records[:len([r for r in good if r["step"] <= 3])] == [r for r in good if r["step"] <= 3]


def test_quiet_prints_nothing(tiny_teacher_file, tmp_path, capsys):
    assert run(tiny_distill_args(tiny_teacher_file, tmp_path / "run", iterations=3)) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("argv", [
    ["distill", "--iterations", str(10**30)],
    ["distill", "--iterations", "0"],
    ["sample", "--teacher", "{teacher}", "--steps", "5000", "--num", "1", "--out", "{tmp}/s"],
    ["sample", "--teacher", "{teacher}", "--steps", "21", "--num", "1", "--out", "{tmp}/s"],
])
def test_absurd_numbers_are_refused(tiny_teacher_file, tmp_path, argv, capsys):
    code = run([a.format(teacher=tiny_teacher_file, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and _one_line(err), err
    assert not (tmp_path / "s").exists()


def test_a_pickle_is_refused_without_suggesting_weights_only_false(tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("owned",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"w": Payload()}))
    code = run(["distill", "--teacher", str(bad), "--teacher-arch", "iddpm-cifar10",
                "--run-dir", str(tmp_path / "run"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2 and _one_line(captured.err), captured.err
    assert "weights_only=False" not in captured.err and "owned" not in captured.out
    assert "not a plain" in captured.err
    assert not (tmp_path / "run").exists()
