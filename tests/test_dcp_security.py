"""Sharded (DCP) checkpoints hold data only: a crafted ``.metadata`` never runs code, the manifest cannot name files
outside the folder or larger than the checkpoint holds, a truncated shard falls back to ``prev.dcp``, and a full
disk during a save names the folder and leaves no partial folder behind."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from train import cli, dcp_checkpoint
from train.checkpoint import CheckpointError
from train.dcp_metadata import SafeFileSystemReader, read_metadata
from train.loop import train
from train.presets import preset_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def command(run: Path, *extra: str) -> list[str]:
    """``python -m train`` arguments of the fixture's run, with ``--fsdp``."""
    args = ["--task", "digits", "--preset", "smoke", "--encoding", "liere8", "--steps", str(STEPS), "--ckpt-every",
            "4", "--eval-every", str(STEPS), "--device", "cpu", "--quiet", "--fsdp", "--out", str(run)]  # fmt: skip
    return [*args, *extra]


def config():
    return preset_config("smoke", "digits", encoding="liere8", steps=STEPS, ckpt_every=4, eval_every=STEPS,
                         device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-process ``--fsdp`` run with ``last.dcp`` (step 8) and ``prev.dcp`` (step 4)."""
    run = tmp_path_factory.mktemp("dcp") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config(), run, quiet=True, fsdp=True)
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()
    return run


@pytest.fixture
def run(fsdp_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fsdp_run, tmp_path / "run"))


def rewrite_manifest(folder: Path, **files: str) -> None:
    """Recompute the manifest's digests (as an attacker can), adding or replacing ``files`` entries."""
    manifest = json.loads((folder / "manifest.json").read_text())
    names = [*manifest["files"], *files]
    manifest["files"] = {name: files.get(name) or _sha(folder / name) for name in names}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Touch:
    """Unpickling this runs ``touch PATH``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return subprocess.run, (["touch", str(self.path)],)


def plant_code(folder: Path, marker: Path) -> None:
    (folder / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
    rewrite_manifest(folder)


def test_crafted_metadata_runs_no_code_in_the_evaluation_loader_or_dcp(run, tmp_path) -> None:
    marker = tmp_path / "pwned"
    plant_code(run / "last.dcp", marker)
    with pytest.raises(CheckpointError, match=r"\.metadata refers to subprocess\.run, which DCP metadata never holds"):
        dcp_checkpoint.load_model(run / "last.dcp")
    with pytest.raises(CheckpointException, match="refers to subprocess.run"):  # DCP wraps the reader's refusal
        dcp.load({}, storage_reader=SafeFileSystemReader(run / "last.dcp"), no_dist=True)
    assert not marker.exists()


def test_crafted_metadata_in_both_checkpoints_is_refused_on_resume(run, tmp_path) -> None:
    marker = tmp_path / "pwned"
    for name in ("last.dcp", "prev.dcp"):
        plant_code(run / name, marker)
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "train", *command(run, "--resume")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == cli.EXIT_USAGE, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "subprocess.run" in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert not marker.exists()


def test_manifest_cannot_name_files_outside_the_folder(run) -> None:
    folder = run / "last.dcp"
    hostname = Path("/etc/hostname")
    original = (folder / "manifest.json").read_text()
    for name in ("../summary.json", str(hostname)):
        manifest = json.loads(original)
        manifest["files"][name] = _sha(hostname)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError, match=f"manifest.json names '{name}', which is not a file name inside"):
            dcp_checkpoint.read(folder)
    (folder / "manifest.json").write_text(original)
    (folder / "notes.txt").write_text("not a checkpoint file")
    rewrite_manifest(folder, **{"notes.txt": ""})
    with pytest.raises(CheckpointError, match=r"lists notes\.txt, which is not part of a checkpoint"):
        dcp_checkpoint.read(folder)


def test_oversized_or_symlinked_shard_is_refused_before_hashing(run, monkeypatch) -> None:
    folder = run / "last.dcp"
    size = (folder / "__0_0.distcp").stat().st_size
    with open(folder / "__0_0.distcp", "ab") as f:
        f.truncate(size + 2**30)  # a sparse GiB: refused by size, never read
    rewrite_manifest(folder, **{"__0_0.distcp": "0" * 64})
    monkeypatch.setattr(dcp_checkpoint, "file_sha256", lambda path: pytest.fail(f"hashed {path}"))
    with pytest.raises(CheckpointError, match=rf"__0_0\.distcp is {size + 2**30} bytes, its metadata says {size}"):
        dcp_checkpoint.read(folder)
    (folder / "__0_0.distcp").unlink()
    (folder / "__0_0.distcp").symlink_to(run / "prev.dcp" / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"missing shard file\(s\) __0_0\.distcp"):
        dcp_checkpoint.read(folder)


def test_truncated_shard_falls_back_to_prev(run, capsys) -> None:
    folder = run / "last.dcp"
    shard = folder / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    rewrite_manifest(folder)
    found = dcp_checkpoint.checkpoint.find_valid(run, names=("last.dcp", "prev.dcp"), reader=dcp_checkpoint.read)
    assert found is not None and found[0].name == "prev.dcp" and found[1]["step"] == 4
    assert "__0_0.distcp is 1000 bytes, its metadata says" in capsys.readouterr().err


def test_metadata_reader_keeps_every_dcp_class(fsdp_run) -> None:
    metadata = read_metadata(fsdp_run / "last.dcp")
    with open(fsdp_run / "last.dcp" / ".metadata", "rb") as f:
        assert pickle.load(f) == metadata  # the restricted reader builds exactly what DCP wrote


WITH_FILE_LIMIT = """
import resource, signal, sys
from train import cli
from train.__main__ import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
cli.run(main, sys.argv[2:])
"""


@pytest.mark.slow
def test_full_disk_during_a_sharded_save_names_the_folder_and_leaves_no_partial(fsdp_run, tmp_path) -> None:
    run = tmp_path / "run"
    limit = (fsdp_run / "last.dcp" / "__0_0.distcp").stat().st_size // 2  # the log fits, a shard file does not
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", WITH_FILE_LIMIT, str(limit), *command(run)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == cli.EXIT_WRITE, done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith(("warning:", "note:"))]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {run}/.partial-4.dcp: File too large")
    assert "Traceback" not in done.stderr
    assert not list(run.glob(".partial-*")) and not (run / "last.dcp").exists()


def test_stop_signals_end_the_process_while_checkpoints_are_verified(run, monkeypatch) -> None:
    """Verification hashes every shard (minutes for a large model): SIGTERM/SIGUSR1 keep their default action
    (end the process) until training starts, when they become checkpoint-and-stop requests."""
    from train import loop

    seen = []
    verify = loop.find_checkpoint

    def recording(*args, **kwargs):
        seen.append({signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)})
        return verify(*args, **kwargs)

    monkeypatch.setattr(loop, "find_checkpoint", recording)
    try:
        train(config(), run, quiet=True, fsdp=True, resume=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert seen == [{signal.SIGTERM: signal.SIG_DFL, signal.SIGUSR1: signal.SIG_DFL}]


def test_pickled_train_state_is_refused_in_one_line_and_falls_back(run, tmp_path, capsys) -> None:
    marker = tmp_path / "pwned"
    folder = run / "last.dcp"
    torch.save({"step": 8, "payload": Touch(marker)}, folder / "train_state.pt")  # a pickle weights_only refuses
    rewrite_manifest(folder)
    found = dcp_checkpoint.checkpoint.find_valid(run, names=("last.dcp", "prev.dcp"), reader=dcp_checkpoint.read)
    assert found is not None and found[0].name == "prev.dcp"
    warning = [line for line in capsys.readouterr().err.splitlines() if "train_state.pt is not plain data" in line]
    assert len(warning) == 1 and "moved it to last.dcp.corrupt" in warning[0]
    assert not marker.exists()


@pytest.mark.slow
def test_ab_evaluate_and_inspect_read_fsdp_folders(tmp_path) -> None:
    from train.ab import evaluate, inspect
    from train.ab import runner as ab

    out = tmp_path / "ab"
    args = ["--preset", "smoke", "--task", "digits", "--encodings", "liere8", "--steps", "6", "--evaluate", "none"]
    try:
        ab.main([*args, "--seeds", "0", "--quiet", "--jobs", "1", "--fsdp", "--out", str(out)])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert (out / "liere8-s0" / "last.dcp").is_dir() and not (out / "liere8-s0" / "last.pt").exists()
    (result,) = evaluate.main([str(out), "--evaluate", "shuffle"])
    assert "shuffle" in result
    assert inspect.main([str(out)]) is not None and "liere8-s0" in (out / inspect.OUTPUT).read_text()
