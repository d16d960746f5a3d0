"""Write any output atomically, never over an input (weights: :mod:`soup_core.io.weights_out`).

Every file the library writes goes through :func:`atomic_path`: the bytes go to a hidden
folder beside the target (``.NAME.PID-XXXX.partial``, where a writer keeps any
temp files of its own), are flushed to disk, and replace the target in one rename. A crash,
a full disk, Ctrl-C or SIGTERM leaves the previous file as it was, never half a file; what a
killed process (SIGKILL) leaves behind is swept by the next write to the same target, once
that process is gone. A full disk is one clear error.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "card.md")
>>> _ = atomic_write(path, "# a soup")
>>> open(path).read(), sorted(os.listdir(os.path.dirname(path)))
('# a soup', ['card.md'])
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from soup_core.errors import CheckpointError

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")


def refuse_inputs(target: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Raise if ``target`` is one of ``inputs`` (by path, or by inode: a hard link), lies inside an
    input folder, or holds one."""
    resolved = Path(target).resolve()
    exists = resolved.is_file()  # else not there yet (or a folder): a link to nothing
    for item in inputs:
        item = Path(item).resolve()
        linked = exists and item.is_file() and os.path.samefile(resolved, item)
        if resolved == item or linked or item in resolved.parents or (resolved in item.parents):
            raise CheckpointError(f"{target}: refusing to write over an input of this run ({item})")


PARTIAL_SUFFIX = ".partial"


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_partials(path: Path) -> list[Path]:
    """Remove what killed writers of ``path`` left beside it; returns what went."""
    swept = []
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*{PARTIAL_SUFFIX}"):
        pid = leftover.name[len(path.name) + 2:].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
            swept.append(leftover)
    return swept


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path beside ``path``; on success it replaces ``path``, on any error it is removed."""
    path = Path(path)
    refuse_special(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=PARTIAL_SUFFIX, dir=path.parent))
    tmp = folder / path.name
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise no_space(path) from None
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def refuse_special(path: Path) -> None:
    """Outputs are regular files: a FIFO, a device, a socket or a folder at the target is left as it
    is (a rename would replace it — ``--json /dev/null`` as root would replace the system's own)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write there ({exc.strerror})") from None
    if stat.S_ISLNK(mode):
        raise CheckpointError(f"{path} is a symbolic link; write to the file it names, or choose another name")
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, a pipe or a socket)"
        raise CheckpointError(f"{path} is {kind}; outputs are written as regular files, so choose another name")


def no_space(target: Path) -> CheckpointError:
    """A full disk, as one line: nothing was written, and what was there is as it was."""
    return CheckpointError(f"{target}: no space left on the device; nothing was written and any previous file is "
                           "unchanged")


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def atomic_folder(target: str | os.PathLike[str], files: Mapping[str, bytes | str],
                  inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Write a folder of small files (a LoRA adapter: its configuration, weights and card) in one
    rename (:func:`staged_folder`), each file flushed. ``target`` must not exist or be an empty
    folder; an input is never written over."""
    target = Path(target)
    refuse_inputs(target, inputs)
    if target.is_symlink() or (target.exists() and (not target.is_dir() or any(target.iterdir()))):
        raise CheckpointError(f"{target}: exists and is not an empty folder; choose a new name")
    try:
        with staged_folder(target) as staging:
            for name, data in files.items():
                with open(staging / name, "wb") as handle:
                    handle.write(data.encode() if isinstance(data, str) else data)
                    handle.flush()
                    os.fsync(handle.fileno())
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise no_space(target) from None
        raise
    return target


def _umask() -> int:
    """This process's umask, read without changing it (Linux), else the usual 022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` to write into, with the permissions a new folder gets; when the
    body ends it becomes ``out`` in one rename (an existing ``out`` is moved aside first and removed
    after: the caller has checked that nothing of anyone else's is in it). An error leaves ``out`` as
    it was; what a kill leaves (``.OUT.PID-….partial``) the next write to ``out`` sweeps."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(out)

    def hidden() -> Path:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=PARTIAL_SUFFIX, dir=out.parent))
    staging, old = hidden(), None
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700: another user (a server) could not read it
    try:
        yield staging
        if out.exists():
            old = hidden()
            os.replace(out, old)  # over an empty folder of our own: one rename
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
