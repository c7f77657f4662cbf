"""The run-folder layout, and the file operations that keep it consistent across crashes.

One training run (``python -m train --out RUN``) writes into ``RUN``::

    metrics.jsonl   one JSON object per logged step (appended; a torn last line is dropped on resume)
    summary.json    the finished run's summary (``train.summaries.RunSummary``)
    last.pt         the newest checkpoint; prev.pt the one before it (``train.checkpoint``)
    last.dcp/       instead, with --fsdp: sharded checkpoint folders last.dcp/, prev.dcp/ (``train.dcp_checkpoint``)
    evaluation.json / test_correct.pt   evaluations of the trained model (``train.ab.evaluate``)
    .lock           the pid of the process training into the folder

An A/B folder (``python -m train.ab --out AB``) holds one such folder per (encoding, seed[, fraction]) and
``results.json`` (``train.summaries.AbResults``), ``results.md``, ``report.md`` and PNG plots.

Whole files (JSON, checkpoints) are written to a temp file in the same folder and renamed into place, so a
crash or a full disk never leaves a half-written file behind; temp files a killed process left are removed
by the next run that takes the folder's lock.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LAST, PREV = "last.pt", "prev.pt"
LAST_DCP, PREV_DCP = "last.dcp", "prev.dcp"  # sharded checkpoint folders of --fsdp runs (train.dcp_checkpoint)
EVALUATION, CORRECT = "evaluation.json", "test_correct.pt"
RESULTS_JSON, RESULTS_MD, REPORT = "results.json", "results.md", "report.md"
CURVES, FINAL = "curves.png", "final.png"
LOCK = ".lock"
MAX_JSON_BYTES = 64 * 2**20  # results, summaries, configs and metrics logs of even long runs are far smaller
TMP_GLOB = ".*.tmp"  # temp files of atomic writes: ``.<name>.<pid>.tmp``


class RunFolderError(ValueError):
    """A run folder or one of its files that cannot be used (message names the file and what to do)."""


class RunExistsError(FileExistsError):
    """A fresh run was asked for in a folder that already holds one."""


class WriteFailed(OSError):
    """A file could not be written (disk full, file too large, no permission); the message names the file and the
    operating system's cause. The command-line tools exit with status 3 (``train.cli``)."""


def os_cause(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err``: itself, or one in its ``__cause__`` / ``__context__`` chain (torch wraps a
    failed write in a ``RuntimeError`` such as ``[enforce fail at inline_container.cc] . unexpected pos``)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OS error while writing ``path`` (also one torch wrapped) into ``WriteFailed`` naming the file."""
    try:
        yield
    except WriteFailed:
        raise
    except (OSError, RuntimeError) as err:
        cause = os_cause(err)
        if cause is None:
            raise
        raise WriteFailed(f"cannot write {path}: {cause.strerror or cause}") from cause


def check_out(out: str | Path) -> Path:
    """``--out`` as a path; ``RunFolderError`` when it is empty, a filesystem root or the home folder itself
    (a run writes, and with ``--restart`` removes, files directly in its folder)."""
    if not str(out).strip():
        raise RunFolderError("--out is empty; name a folder for the run, e.g. runs/NAME")
    path = Path(out)
    resolved = path.expanduser().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        what = "the home folder" if resolved == Path.home().resolve() else "a filesystem root"
        raise RunFolderError(f"--out {str(out)!r} is {what}; name a folder inside it for the run, e.g. runs/NAME")
    return path


def warn(message: str) -> None:
    """A one-line warning on stderr (something was repaired or skipped; the run goes on)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def tmp_path(path: Path) -> Path:
    """The temp file an atomic write of ``path`` goes through (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a fsynced temp file and a rename: readers see the old or the new file."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_figure(figure: Any, path: str | Path, dpi: int) -> Path:
    """A matplotlib figure saved as PNG atomically (a symlink at ``path`` is replaced, never written through)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return write_bytes_atomic(path, buffer.getvalue())


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` (created if absent), refusing to follow a symbolic link out of the folder."""
    path = Path(path)
    with writing(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if path.is_symlink():
                raise RunFolderError(f"{path} is a symbolic link; files in a run folder must be plain files") from err
            raise
        with os.fdopen(fd, "a") as f:
            f.write(text)


def write_json(path: str | Path, value: Any) -> Path:
    """``value`` as indented JSON, written atomically."""
    return write_bytes_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


def write_text(path: str | Path, text: str) -> Path:
    """``text`` written atomically."""
    return write_bytes_atomic(path, text.encode())


def read_bounded_text(path: str | Path, limit: int = MAX_JSON_BYTES) -> str:
    """The text of ``path``, refused (``RunFolderError`` naming it) when larger than ``limit`` bytes."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise RunFolderError(f"{path} does not exist") from None
    if size > limit:
        raise RunFolderError(f"{path} is {size} bytes, more than a run folder's JSON files hold ({limit})")
    return path.read_text()


def parse_json(text: str, path: Path) -> Any:
    """``json.loads`` whose nesting-depth failure is a ``RunFolderError`` naming ``path`` (no RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise RunFolderError(f"{path} is nested too deeply to be a file this program wrote") from None


def read_json(path: str | Path) -> Any:
    """The JSON content of ``path``; ``RunFolderError`` naming the file when it is missing, too large, too deeply
    nested, empty or invalid."""
    path = Path(path)
    text = read_bounded_text(path)
    try:
        return parse_json(text, path)
    except json.JSONDecodeError as err:
        what = "is empty" if not text.strip() else f"is not valid JSON ({err})"
        raise RunFolderError(f"{path} {what}; delete it to have it rebuilt, or restore it from a backup") from err


def read_jsonl(path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a JSON-lines file. A torn last line (a killed or disk-full write) is dropped with a warning,
    and with ``repair`` also cut from the file; a bad line elsewhere raises ``RunFolderError`` naming the line.
    """
    path = Path(path)
    lines = read_bounded_text(path).splitlines(keepends=True)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = parse_json(line, path)
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise RunFolderError(f"{path}, line {number} is not valid JSON ({err}); fix or delete it") from err
            warn(f"{path}: dropped a torn last line ({len(line)} bytes, left by an interrupted write)")
            if repair:
                write_text(path, "".join(lines[: number - 1]))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
            raise RunFolderError(f"{path}, line {number} is not a metrics record (a JSON object with an int step)")
        records.append(record)
    return records


def run_files(path: str | Path) -> list[str]:
    """Names of the files of (part of) a training run present in ``path``: checkpoints, summary, metrics log."""
    return [name for name in (LAST, PREV, LAST_DCP, PREV_DCP, SUMMARY, METRICS) if (Path(path) / name).exists()]


def has_run(path: str | Path) -> bool:
    """Whether ``path`` already holds (part of) a training run: a checkpoint, a summary or a metrics log."""
    return bool(run_files(path))


def remove_run_files(path: str | Path) -> list[Path]:
    """Remove a training run's files from ``path`` (checkpoints, logs, summary, evaluations) to train it again."""
    found = [Path(path) / name for name in (*run_files(path), EVALUATION, CORRECT)]
    found = [item for item in found if item.exists()]
    for item in found:
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    return found


def clean_temp_files(path: str | Path) -> list[Path]:
    """Remove the temp files of interrupted atomic writes in ``path`` (call it holding the folder's lock)."""
    stale = sorted(Path(path).glob(TMP_GLOB))
    for file in stale:
        file.unlink(missing_ok=True)
    return stale


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no such pid can exist
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive use of a run folder by one process: ``with RunLock(folder): ...``.

    The lock file holds ``host pid``. A second process refuses with ``RunFolderError``; a lock whose process
    is gone (same host) is taken over with a note. The lock is removed on exit.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK
        self.owner = f"{socket.gethostname()} {os.getpid()}"

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.owner + "\n")
        return True

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._create():
            return self
        host, _, pid = self.path.read_text().strip().partition(" ")
        if host == socket.gethostname() and pid.isdigit() and not alive(int(pid)):
            print(f"note: {self.path} was left by process {pid}, which is gone; taking the folder over", flush=True)
            self.path.unlink(missing_ok=True)
            if self._create():
                return self
            host, _, pid = self.path.read_text().strip().partition(" ")
        raise RunFolderError(
            f"{self.path.parent} is in use by process {pid} on {host} (lock file {self.path}); wait for that run "
            f"to finish or stop it, or choose another --out. If no such process exists, delete {self.path}"
        )

    def release(self) -> None:
        if self.path.is_file() and self.path.read_text().strip() == self.owner:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_folder(run_dir: Path, resume: bool, restart: bool = False) -> None:
    """Refuse (before any data is loaded) to start a fresh run in a folder that holds one, unless ``restart``."""
    if resume and restart:
        raise ValueError("--resume continues the run in --out and --restart starts it over: pass one of them")
    if not (resume or restart) and (found := run_files(run_dir)):
        raise RunExistsError(
            f"{run_dir} already holds a run ({found[0]}); pass --resume to continue it, --restart to train it again "
            "from step 0 (replacing its files), or choose another --out"
        )
