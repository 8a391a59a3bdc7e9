"""Command-line plumbing shared by every script: user errors and atomic file writes.

A mistake the user can fix (a missing folder, a flag that disagrees with a
checkpoint, ...) is raised as `UserError` anywhere in the library; `run_main`
turns it into one line on stderr and exit status 2, with no traceback.
Files are written under a temporary name and renamed when complete, so a crash
never leaves a partial file that looks finished.
"""

import contextlib
import os
import shutil
import sys
import tempfile


class UserError(ValueError):
    """A problem with the user's input: reported as one line, exit status 2.

    It is a ValueError, so library callers can catch it like any bad argument.
    """


def run_main(main, *args, **kwargs):
    """Run a script's `main`, reporting `UserError` as `error: ...` and exit status 2."""
    try:
        return main(*args, **kwargs)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    stem, ext = os.path.splitext(base)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary folder beside `path`; if the block succeeds it replaces `path` (and any
    earlier folder there), otherwise it is removed and an earlier `path` stays untouched."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj, path):
    """`torch.save` that never leaves a half-written file at `path`."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path, text):
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def require_dir(path, flag):
    """Raise a UserError naming `flag` unless `path` is an existing directory."""
    if not path:
        raise UserError(f"{flag} is required")
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory")
    return path


def require_file(path, flag):
    """Raise a UserError naming `flag` unless `path` is an existing file."""
    if not path:
        raise UserError(f"{flag} is required")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    return path
