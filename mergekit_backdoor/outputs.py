"""Outputs that appear atomically, never on top of an input, and never half-written.

Every writer goes through :func:`staged_folder` (a folder) or :func:`staged_file` (a file):

- the output is filled under a hidden sibling name ``.NAME.partial-PID-HOST-RANDOM`` and
  renamed into place when complete, so an interrupted run never leaves something that looks
  finished; SIGTERM (``kill``, Docker, Slurm) cleans up as Ctrl-C does;
- a staging folder left by a run that died (same host, process gone) is removed by the next run
  writing the same output;
- two runs writing the same folder at once: the second stops at once (a lock file
  ``.NAME.lock``), and publishing never replaces an output that appeared meanwhile unless
  overwriting was asked for;
- staging names are shortened so that they fit whenever the final name does;
- files get the permissions the umask allows (temporary files are created owner-only).

:func:`refuse_output_overlapping` is the one check that an output is not, does not contain and
does not lie inside any input: it holds with or without ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mergekit_backdoor.errors import BackdoorError, OutputExistsError, OutputOverlapsInputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; publishing still never replaces silently
    fcntl = None  # type: ignore[assignment]

OVERWRITE_ENV = "MERGEKIT_BACKDOOR_OVERWRITE"
_NAME_MAX = 255  # bytes in one path component (Linux, macOS)
_TAG_MAX = 50  # "PID-HOST-RANDOM": up to 7 + 1 + 32 + 1 + 8 characters
# no "@" or "+" in staging names: mergekit reads them as a revision and a LoRA separator
_TAG = re.compile(r"^(?P<pid>\d+)-(?P<host>[A-Za-z0-9.-]*)-[0-9a-f]{8}$")


# ----------------------------------------------------------------------------- inputs


def local_paths(reference: str | os.PathLike[str] | None) -> list[Path]:
    """The local folders or files behind a model reference (``path``, ``base+adapter``)."""
    if reference is None:
        return []
    text = str(reference)
    if os.path.exists(text):
        return [Path(text)]
    return [Path(part) for part in text.split("+") if part and os.path.exists(part)]


def refuse_output_overlapping(out: str | os.PathLike[str],
                              inputs: Iterable[str | os.PathLike[str] | None],
                              *, what: str = "output") -> None:
    """OutputOverlapsInputError when ``out`` is, contains or lies inside any existing input.

    Paths are compared with symlinks resolved. ``--overwrite`` never lifts this: replacing the
    output would delete the input.
    """
    target = Path(out).expanduser().resolve()
    for item in inputs:
        for source in local_paths(item):
            real = source.expanduser().resolve()
            if target == real:
                relation = "is"
            elif target.is_relative_to(real):
                relation = "lies inside"
            elif real.is_relative_to(target):
                relation = "contains"
            else:
                continue
            raise OutputOverlapsInputError(
                f"{out}: the {what} {relation} the input {item}; write it somewhere outside "
                "every input (nothing was written)"
            )


def ensure_output_free(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{out}: output folder exists and is not empty; "
            f"pass --overwrite (or {OVERWRITE_ENV}=1) to replace it"
        )


# ----------------------------------------------------------------------------- staging names


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname())[:32]


def _stem(name: str) -> str:
    """``name``, or a shortened form with a hash of it, so that ``.STEM.partial-TAG`` fits."""
    budget = _NAME_MAX - _TAG_MAX - len(".") - len(".partial-")
    if len(name.encode()) <= budget:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    head = name.encode()[: budget - 9].decode(errors="ignore")
    return f"{head}~{digest}"


def _staging_name(name: str, kind: str) -> str:
    return f".{_stem(name)}.{kind}-{os.getpid()}-{_host()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(out: Path) -> None:
    """Remove staging leftovers of ``out`` whose run died on this host (live runs are kept)."""
    stem, host = _stem(out.name), _host()
    for entry in out.parent.iterdir() if out.parent.is_dir() else []:
        for kind in ("partial", "old"):
            prefix = f".{stem}.{kind}-"
            if not entry.name.startswith(prefix):
                continue
            match = _TAG.match(entry.name[len(prefix):])
            if match and match["host"] == host and not _alive(int(match["pid"])):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- signals, locks


@contextmanager
def terminate_cleanly() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit(143) so ``finally``/``except`` clean up
    as for Ctrl-C; the previous handler is restored afterwards (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` next to ``out``: a second run writing the same output stops at once."""
    if fcntl is None:
        yield
        return
    lock = out.parent / f".{_stem(out.name)}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise BackdoorError(f"{out}: cannot write in {out.parent} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another run"
            os.close(fd)
            raise OutputExistsError(
                f"{out}: {holder} is writing this output right now; wait for it or choose "
                "another output"
            ) from None
        try:  # the file we locked may have been unlinked by the run that just finished
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"run {os.getpid()} on {_host()}".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


# ----------------------------------------------------------------------------- permissions


def current_umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_umask(path: Path) -> None:
    """Give ``path`` (and a folder's whole tree) the permissions a plain ``open``/``mkdir``
    would have: owner-only temporary files (mkstemp, safetensors) become readable as usual."""
    umask = current_umask()

    def fix(item: Path, is_dir: bool) -> None:
        executable = is_dir or bool(item.stat().st_mode & 0o111)
        os.chmod(item, (0o777 if executable else 0o666) & ~umask)

    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name, is_dir in [*((d, True) for d in dirs), *((f, False) for f in files)]:
                if not os.path.islink(os.path.join(root, name)):  # never chmod a link's target
                    fix(Path(root) / name, is_dir)
    fix(path, path.is_dir())


# ----------------------------------------------------------------------------- writers


def _publish_folder(partial: Path, out: Path, overwrite: bool) -> None:
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"{out}: appeared while this run was writing it; it was kept and this run's "
                "result discarded"
            )
        trash = out.parent / _staging_name(out.name, "old")
        out.rename(trash)
        partial.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        partial.rename(out)  # atomic; replaces an empty folder, never a non-empty one
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise OutputExistsError(
                f"{out}: appeared while this run was writing it; it was kept and this run's "
                "result discarded"
            ) from None
        raise


@contextmanager
def staged_folder(out: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """A hidden sibling folder to fill; renamed to ``out`` on success, removed on failure."""
    out = Path(out).absolute()
    ensure_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _output_lock(out), terminate_cleanly():
        remove_stale_staging(out)
        ensure_output_free(out, overwrite)  # again, under the lock
        partial = out.parent / _staging_name(out.name, "partial")
        partial.mkdir()
        try:
            yield partial
            match_umask(partial)
            _publish_folder(partial, out, overwrite)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


@contextmanager
def staged_file(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """A hidden sibling file to write; moved to ``path`` on success, removed on failure.

    Without ``overwrite`` an existing ``path`` is refused, also one that appears while writing
    (published with a hard link, which never replaces).
    """
    path = Path(path).absolute()
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a folder, expected a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    with terminate_cleanly():
        remove_stale_staging(path)
        partial = path.parent / _staging_name(path.name, "partial")
        try:
            yield partial
            match_umask(partial)
            if overwrite:
                os.replace(partial, path)
                return
            try:
                os.link(partial, path)
            except FileExistsError:
                raise OutputExistsError(f"{path}: appeared while this run was writing it; it "
                                        "was kept and this run's result discarded") from None
            except OSError:  # a file system without hard links
                if path.exists():
                    raise OutputExistsError(f"{path} exists; pass --overwrite to replace it"
                                            ) from None
                os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> Path:
    """``text`` written to ``path`` atomically (UTF-8, ``\\n`` line ends)."""
    with staged_file(path, overwrite) as partial:
        with open(partial, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)
