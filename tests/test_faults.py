"""Faults say so: a full disk names the file and keeps the last checkpoint, ``--resume`` never silently starts
over, checkpoints are refused before the data loads, caches verify, local sources are bounded, ``--out`` is
checked, and no command prints a traceback without ``--debug``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import checkpoint, cli, loop
from train import data as data_module
from train import run_dir as layout
from train.__main__ import main as train_main
from train.ab import inspect
from train.ab import runner as ab
from train.data import folder, text
from train.loop import train
from train.presets import preset_config
from train.summaries import RunSummary

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--task", "digits", "--preset", "smoke", "--encoding", "liere8", "--device", "cpu", "--quiet"]
SMOKE_ARROW = {"image_size": 32, "grid": 4, "num_train": 64, "num_val": 16, "num_test": 16}
WITH_FILE_LIMIT = """
import resource, signal, sys
from train import cli
from train.__main__ import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
cli.run(main, sys.argv[2:])
"""


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _train_limited(limit: int, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m train`` with files limited to ``limit`` bytes (``ulimit -f``)."""
    cmd = [sys.executable, "-c", WITH_FILE_LIMIT, str(limit), *ARGS, "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _one_error_line(done: subprocess.CompletedProcess, status: int) -> str:
    assert done.returncode == status, done.stderr
    error = [line for line in done.stderr.splitlines() if not line.startswith(("warning:", "note:"))]
    assert len(error) == 1 and error[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    return error[0]


class Crash(Exception):
    """Raised by a hook to stop a run mid-way, as a crash would (checkpoints so far stay)."""


def _crash_at_17(step: int, model) -> None:
    if step == 17:
        raise Crash


def _config(**changes):
    """The config of ``python -m train ARGS``."""
    return preset_config("smoke", "digits", **({"encoding": "liere8", "device": "cpu"} | changes))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """``full``: an uninterrupted smoke run (checkpoints at 15 and 30); ``crashed``: stopped after step 17. One
    thread, as in the ``python -m train`` processes they are compared with (``OMP_NUM_THREADS=1``)."""
    root, threads = tmp_path_factory.mktemp("faults"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_config(), root / "full", quiet=True)
        with pytest.raises(Crash):
            train(_config(), root / "crashed", quiet=True, hooks=[_crash_at_17])
    finally:
        torch.set_num_threads(threads)
    assert checkpoint.read(root / "crashed" / layout.LAST)["step"] == 15
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _sha(run: Path) -> str:
    return RunSummary.load(run / layout.SUMMARY).state_sha256


# ---------------------------------------------------------------- full disk


@pytest.mark.slow
def test_failed_checkpoint_write_names_file_and_cause_and_resume_continues(runs, tmp_path, python_module):
    run = _copy(runs / "crashed", tmp_path / "run")
    done = _train_limited(64 * 1024, run, "--resume")  # the log fits, the step-30 checkpoint (1.3 MB) does not
    error = _one_error_line(done, cli.EXIT_WRITE)
    assert error == (
        f"error: cannot write {run}/last.pt: File too large; the last good checkpoint, {run}/last.pt (step 15), "
        "is kept. Free some space, then continue with --resume"
    )
    assert checkpoint.read(run / layout.LAST)["step"] == 15 and not list(run.glob(layout.TMP_GLOB))
    assert python_module("train", *ARGS, "--out", run, "--resume").returncode == 0
    assert _sha(run) == _sha(runs / "full")


@pytest.mark.slow
def test_failed_metrics_write_names_file_and_cause_and_resume_continues(runs, tmp_path, python_module):
    run = _copy(runs / "crashed", tmp_path / "run")
    limit = (run / layout.METRICS).stat().st_size + 10  # the kept records fit, the step-20 record does not
    error = _one_error_line(_train_limited(limit, run, "--resume"), cli.EXIT_WRITE)
    assert error.startswith(f"error: cannot write {run}/metrics.jsonl: File too large; the last good checkpoint")
    done = python_module("train", *ARGS, "--out", run, "--resume")
    assert done.returncode == 0 and "torn last line" in done.stderr  # the cut record is dropped
    assert _sha(run) == _sha(runs / "full")
    assert [r["step"] for r in layout.read_jsonl(run / layout.METRICS)] == list(range(5, 31, 5))


@pytest.mark.slow
def test_full_tmpfs_says_no_space_left(tmp_path):
    """A real full disk: a 2 MiB tmpfs holds one checkpoint (1.3 MB) but not the second one's temp file."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command to mount a private tmpfs")
    mount = 'mount -t tmpfs -o size=2m tmpfs "$0" || exit 97; exec "$@"'
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, str(tmp_path)]
    cmd += [sys.executable, "-m", "train", *ARGS, "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    if done.returncode == 97 or done.stderr.startswith("unshare:"):
        pytest.skip(f"this machine does not allow mounting a tmpfs here: {done.stderr.strip()[:200]}")
    error = _one_error_line(done, cli.EXIT_WRITE)
    assert f"cannot write {tmp_path}/run/last.pt: No space left on device" in error
    assert f"the last good checkpoint, {tmp_path}/run/last.pt (step 15), is kept" in error


# ---------------------------------------------------------------- resume never silently starts over


@pytest.mark.slow
def test_resume_without_checkpoint_refuses_and_restart_starts_over(runs, tmp_path, failing_command):
    run = _copy(runs / "full", tmp_path / "run")
    for name in (layout.LAST, layout.PREV):
        (run / name).unlink()
    files = lambda: {p.name: p.read_bytes() for p in run.iterdir()}  # noqa: E731
    before = files()
    error = _one_error_line(failing_command(train_main, *ARGS, "--out", run, "--resume"), cli.EXIT_USAGE)
    assert f"{run} holds a run (summary.json) but no last.pt or prev.pt" in error and "--restart" in error
    assert files() == before
    (run / layout.SUMMARY).unlink()
    with pytest.raises(layout.RunFolderError, match=r"\(metrics\.jsonl up to step 30\) but no last\.pt"):
        train(_config(), run, resume=True, quiet=True)
    assert files() == {k: v for k, v in before.items() if k != layout.SUMMARY}
    with pytest.raises(ValueError, match="pass one of them"):
        train(_config(), run, resume=True, restart=True, quiet=True)
    summary = train(_config(), run, restart=True, quiet=True)
    assert summary.steps == 30 and [r["step"] for r in layout.read_jsonl(run / layout.METRICS)] == list(range(5, 31, 5))


@pytest.mark.parametrize("logged", [5, 15])  # 15: stopped between step 15's metrics line and its checkpoint
def test_resume_before_the_first_checkpoint_starts_over_saying_so(tmp_path, capsys, logged):
    (tmp_path / layout.METRICS).write_text(json.dumps({"step": logged, "loss": 2.0}) + "\n")
    train(_config(steps=6, ckpt_every=15), tmp_path, resume=True, quiet=True)
    assert f"no checkpoint yet (metrics.jsonl ends at step {logged}, the first checkpoint is due at step 15)" in (
        capsys.readouterr().err
    )
    assert [r["step"] for r in layout.read_jsonl(tmp_path / layout.METRICS)][-1] == 6  # the old lines are gone


# ---------------------------------------------------------------- fail fast


@pytest.fixture
def no_data(monkeypatch):
    """Loading the data set raises: whatever is refused before it is refused before the data loads."""

    def refuse(config, root=None):
        raise AssertionError("data loaded")

    monkeypatch.setattr(loop, "load_task", refuse)


@pytest.mark.slow
def test_bad_checkpoints_are_refused_before_the_data_loads(runs, tmp_path, no_data):
    run = _copy(runs / "crashed", tmp_path / "run")
    with pytest.raises(AssertionError, match="data loaded"):  # a good checkpoint gets as far as the data
        train(_config(), run, resume=True, quiet=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"different run; mismatched config: lr: 0\.003"):
        train(_config(lr=1e-3), run, resume=True, quiet=True)
    state = torch.load(run / layout.LAST, weights_only=True)
    state["model_spec"] = {"class": "os.system", "kwargs": {"command": "true"}}
    torch.save(state | {"checksum": checkpoint.checksum(state)}, run / layout.LAST)
    with pytest.raises(checkpoint.CheckpointError, match="refused model class 'os.system'"):
        train(_config(), run, resume=True, quiet=True)
    (run / layout.LAST).write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        train(_config(), run, resume=True, quiet=True)


@pytest.mark.slow
def test_ab_resume_refuses_a_foreign_checkpoint_before_the_data_loads(runs, tmp_path, monkeypatch):
    _copy(runs / "crashed", tmp_path / "ab" / "liere8-s0")
    monkeypatch.setattr(ab, "load_task", lambda config: pytest.fail("data loaded"))
    args = ["--preset", "smoke", "--task", "digits", "--encodings", "liere8", "--lr", "0.001", "--jobs", "1"]
    with pytest.raises(checkpoint.CheckpointError, match=r"liere8-s0/last\.pt belongs to a different run.*lr: 0\.003"):
        ab.main([*args, "--out", str(tmp_path / "ab"), "--resume", "--quiet"])


# ---------------------------------------------------------------- --out


@pytest.mark.parametrize(("out", "needle"), [("", "--out is empty"), ("/", "is a filesystem root"),
                                             ("~", "is the home folder")])  # fmt: skip
def test_out_refuses_empty_root_and_home(tmp_path, out, needle, failing_command):
    with pytest.raises(layout.RunFolderError, match=needle):
        layout.check_out(out)
    for main, args in ((train_main, ARGS), (ab.main, ["--task", "digits"])):
        assert needle in _one_error_line(failing_command(main, *args, "--out", os.path.expanduser(out)), cli.EXIT_USAGE)
    assert layout.check_out(tmp_path / "run") == tmp_path / "run"


# ---------------------------------------------------------------- data cache


def _arrow(root: Path) -> data_module.ImageSplits:
    return data_module.load_dataset("arrow", root=root, **SMOKE_ARROW)


def _flip_image_byte(path: Path) -> None:
    """Flip one byte inside the stored train images (the zip container stays valid)."""
    images = torch.load(path, weights_only=True)["train"]["images"]
    raw, stored = images.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), bytearray(path.read_bytes())
    at = stored.find(raw[:4096]) + 2000
    assert at > 2000
    stored[at] ^= 0xFF
    path.write_bytes(bytes(stored))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_flip_image_byte, "does not match its checksum"),
        (lambda p: torch.save({}, p), "lacks ['train', 'val', 'test', 'source']"),
        (lambda p: torch.save({"train": {}, "source": "x"}, p), "lacks ['val', 'test']"),
        (lambda p: torch.save([1, 2], p), "holds a list, not a dict"),
        (lambda p: (p.unlink(), p.mkdir(), (p / "x").write_text("x")), "is unreadable (IsADirectoryError"),
        (lambda p: torch.save({"train": torch.zeros(1).expand(2**33)}, p), "is unreadable (OversizedTensor: "),
    ],
)
def test_corrupt_or_malformed_cache_is_named_and_rebuilt(tmp_path, capsys, damage, problem):
    first = _arrow(tmp_path)
    (path,) = tmp_path.glob("arrow_*.pt")
    damage(path)
    capsys.readouterr()
    again = _arrow(tmp_path)
    err = capsys.readouterr().err
    assert f"[data] cache file {path} {problem}" in err and "rebuilding it" in err
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.test.labels, first.test.labels)
    _arrow(tmp_path)
    assert capsys.readouterr().err == ""  # the rebuilt file verifies


def test_cache_without_checksum_gets_one_and_stale_temp_files_go(tmp_path, capsys):
    first = _arrow(tmp_path)
    (path,) = tmp_path.glob("arrow_*.pt")
    stored = torch.load(path, weights_only=True)
    assert stored["checksum"] == checkpoint.checksum(stored)
    torch.save({k: v for k, v in stored.items() if k != "checksum"}, path)  # as written before checksums
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{path.name}.{socket.gethostname()}.{dead.stdout.strip()}.tmp"
    live = tmp_path / f".{path.name}.{socket.gethostname()}.{os.getppid()}.tmp"  # a write in progress: kept
    stale.write_bytes(b"left by a killed write")
    live.write_bytes(b"being written")
    capsys.readouterr()
    again = _arrow(tmp_path)
    err = capsys.readouterr().err
    assert "has no checksum (written by an older version); adding one" in err and "removed 1 temp file(s)" in err
    assert torch.equal(again.train.images, first.train.images)
    assert not stale.exists() and live.exists()
    assert "checksum" in torch.load(path, weights_only=True)


# ---------------------------------------------------------------- local sources


def test_local_text_sources_are_bounded(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="text:PATH: /dev/zero is not a regular file"):
        data_module.load_dataset("text:/dev/zero")
    with pytest.raises(ValueError, match=f"text:PATH: {tmp_path} is a folder"):
        data_module.load_dataset(f"text:{tmp_path}")
    (tmp_path / "a.txt").write_text("abc" * 100)
    monkeypatch.setattr(text, "MAX_BYTES", 299)
    with pytest.raises(ValueError, match="is larger than the 299 bytes text:PATH reads"):
        data_module.load_dataset(f"text:{tmp_path / 'a.txt'}")
    monkeypatch.setattr(text, "MAX_BYTES", 300)
    assert len(data_module.load_dataset(f"text:{tmp_path / 'a.txt'}").vocab) == 3


def test_local_image_folder_scan_is_bounded(monkeypatch):
    monkeypatch.setattr(folder, "MAX_FILES", 1000)
    with pytest.raises(ValueError, match=r"folder:PATH: /proc/self holds more than 1000 files \(following links\)"):
        data_module.load_dataset("folder:/proc/self")
    monkeypatch.setattr(folder, "MAX_SCAN_S", 0.0)
    with pytest.raises(ValueError, match=r"folder:PATH: scanning /proc/self took over 0 s"):
        data_module.load_dataset("folder:/proc/self")


# ---------------------------------------------------------------- no tracebacks


@pytest.mark.parametrize(
    ("main", "args", "needle"),
    [
        (inspect.main, ["{tmp}"], "neither results.json"),
        (inspect.main, ["{tmp}/missing"], "neither results.json"),
        (train_main, [*ARGS, "--task", "text:{tmp}", "--out", "{tmp}/run"], "is a folder"),
        (train_main, [*ARGS, "--task", "text:/dev/zero", "--out", "{tmp}/run"], "is not a regular file"),
    ],
)
def test_cli_errors_are_one_line_without_debug(tmp_path, failing_command, main, args, needle):
    args = [a.format(tmp=tmp_path) for a in args]
    assert needle in _one_error_line(failing_command(main, *args), cli.EXIT_USAGE)
    with pytest.raises(ValueError, match=needle):  # --debug: the exception itself, with its traceback
        cli.run(main, [*args, "--debug"])


@pytest.mark.slow
def test_inspect_cli_gives_one_line(tmp_path, python_module):
    """``python -m train.ab.inspect`` itself (its ``__main__`` block) goes through ``cli.run``."""
    assert "neither results.json" in _one_error_line(python_module("train.ab.inspect", tmp_path), cli.EXIT_USAGE)
