"""Writing files so that no reader ever sees half of one: atomic file writes, and whole directories staged beside
their final place and swapped in only once complete."""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from mmgpt.errors import UserError

STAGING = ".partial-"  # marks a directory being written; never a result
OLD = ".old"  # `.<name>.old.partial-<pid>`: the previous copy of <name> while a replace swaps the new one in


def check_component(name: str, what: str = "name") -> str:
    """`name` must be one ordinary path component: a directory created under a root, never the root itself, a
    parent, a nested path or a hidden (staging) name."""
    if (not isinstance(name, str) or not name.strip() or name in (".", "..") or name.startswith(".")
            or any(c in name for c in "/\\\0") or STAGING in name):
        raise UserError(f"{what}={name!r} must be one plain directory name (not empty, not '.' or '..', no '/', "
                        "not starting with '.'); pass e.g. name=digits_run1")
    return name


def write_atomic(path, data: bytes | str) -> None:
    """Write `data` to a temporary sibling, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` and `except BaseException` runs."""


# Set once SIGTERM arrived: libraries may wrap the exception raised for it (torch.onnx does), the flag survives.
terminated = threading.Event()


@contextmanager
def sigterm_raises():
    """Within this block SIGTERM unwinds the stack like SIGINT does (the default handler would kill the process
    without cleaning up). Only the main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        terminated.set()
        raise Terminated(f"terminated by signal {signum}")
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(root: Path) -> list[tuple[Path, str]]:
    """Clean up after processes that no longer run (killed with SIGKILL, or a machine that went down): a staging
    directory is removed; the previous copy of a replace killed between its two renames is restored where the
    final directory is missing (it is then the only copy), removed where the new one is in place.
    Returns (path, "removed" | "restored") for each."""
    done = []
    for p in sorted(Path(root).glob(f".*{STAGING}*")) if Path(root).is_dir() else []:
        head, _, tail = p.name.partition(STAGING)
        try:
            pid = int(tail.split("-", 1)[0])
        except ValueError:
            continue
        if not p.is_dir() or _pid_alive(pid):
            continue
        final = p.with_name(head[1:].removesuffix(OLD)) if head.endswith(OLD) and not tail.count("-") else None
        if final is not None and not final.exists():
            os.replace(p, final)
            done.append((p, "restored"))
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append((p, "removed"))
    return done


@contextmanager
def staging_dir(final: Path):
    """Yield an empty sibling directory of `final`; when the block succeeds it replaces `final` whole, when it fails
    (an exception, Ctrl-C or SIGTERM) it is removed and `final` stays as it was."""
    final = Path(final)
    check_component(final.name)  # never the root itself (an empty name), a parent or a path outside it
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{STAGING}{os.getpid()}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the result private to this user
    old = final.with_name(f".{final.name}{OLD}{STAGING}{os.getpid()}")
    try:
        with sigterm_raises():
            yield tmp
            if final.exists():
                os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                if old.exists():
                    os.replace(old, final)
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
