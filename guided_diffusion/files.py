"""Files written whole or not at all, and write failures in one line.

Files are written under a temporary name and renamed when complete (`atomic_path`,
`atomic_directory`, `atomic_torch_save`, `atomic_write_text`), so a crash never leaves a partial
file that looks finished. A file that cannot be written (a full disk, a quota, a file-size limit,
an I/O error, no permission) is `WriteError`, raised by these writers and by `logger`: one line
naming the file and the cause, the temporary file removed; `cli.run_main` reports it with exit
status 74.
"""

import contextlib
import errno
import os
import shutil
import tempfile

# What the user can act on, for the causes a write meets on shared clusters.
_WRITE_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit: ulimit -f, or the file system's)",
    errno.EIO: "input/output error (the disk or the network file system failed)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ESTALE: "stale file handle (the network file system lost the file)",
}


def os_error_cause(err):
    """The cause of an OSError in words: 'no space left on device', ..."""
    if err.errno in _WRITE_CAUSES:
        return _WRITE_CAUSES[err.errno]
    if err.strerror:
        return err.strerror[0].lower() + err.strerror[1:]
    return str(err) or type(err).__name__


class WriteError(OSError):
    """A file that could not be written: `cannot write PATH: CAUSE[; NOTE]`, exit status 74.

    An OSError (with the errno of its cause), so callers that handle I/O errors still see it.
    """

    def __init__(self, path, cause, errno_=None, note=""):
        super().__init__(errno_, cause, os.fspath(path))
        self.path, self.cause, self.note = os.fspath(path), cause, note

    def with_note(self, note):
        """The same error with `note` appended (e.g. where the last complete checkpoint is)."""
        return WriteError(self.path, self.cause, self.errno, note)

    def __str__(self):
        return f"cannot write {self.path}: {self.cause}" + (f"; {self.note}" if self.note else "")

    def __reduce__(self):
        return WriteError, (self.path, self.cause, self.errno, self.note)


def _is_torch_write_failure(err):
    # torch.save reports a failed write as an enforce failure of its zip writer, without the errno.
    return isinstance(err, RuntimeError) and ("inline_container" in str(err) or "PytorchStreamWriter" in str(err))


def as_write_error(err, path, written=None):
    """`err` as a WriteError naming `path` when it is a failure to write `path` (or, for a folder,
    the files in it); otherwise None. `written` is where the bytes actually went (a temporary name):
    an OSError naming any other file, an input, is not a write failure of `path`."""
    if isinstance(err, WriteError):
        return err
    if isinstance(err, OSError):
        if err.filename is not None:
            name = os.path.abspath(os.fsdecode(err.filename))
            ours = [os.path.abspath(p) for p in (path, written) if p is not None]
            if not any(name == p or name.startswith(p + os.sep) for p in ours):
                return None
            if written is not None and name.startswith(os.path.abspath(written) + os.sep):
                path = os.path.join(path, os.path.relpath(name, os.path.abspath(written)))
        return WriteError(path, os_error_cause(err), err.errno)
    if _is_torch_write_failure(err):
        return WriteError(path, "the write failed (" + str(err).splitlines()[0] + "): is the disk full?")
    return None


@contextlib.contextmanager
def writing(path):
    """Turn a failure to write `path` inside the block into a `WriteError` naming it."""
    try:
        yield
    except Exception as err:
        converted = as_write_error(err, path)
        if converted is None or converted is err:
            raise
        raise converted from None


def _reraise_as_write_error(err, path, written):
    converted = as_write_error(err, path, written)
    if converted is not None and converted is not err:
        raise converted from None


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    The file is flushed to disk before the rename (a network file system may report a full quota
    only then). A failure to write it is a `WriteError` naming `path`; the temporary file is removed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    with writing(path):
        os.makedirs(directory, exist_ok=True)
        base = os.path.basename(path)
        stem, ext = os.path.splitext(base)
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=directory)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
    try:
        yield tmp
        _flush_to_disk(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        _reraise_as_write_error(err, path, tmp)
        raise


def _flush_to_disk(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary folder beside `path`; if the block succeeds it replaces `path` (and any
    earlier folder there), otherwise it is removed and an earlier `path` stays untouched.

    A failure to write a file in it is a `WriteError` naming that file at its final place (or `path`).
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    with writing(path):
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
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _reraise_as_write_error(err, path, tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _WholeWrites:
    """A file for torch.save that writes every byte or raises, and keeps the OSError it raised:
    torch's zip writer replaces it by an enforce failure that has lost the errno."""

    def __init__(self, file):
        self.file = file
        self.error = None

    def write(self, data):
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[self.file.write(view):]
        except OSError as err:
            self.error = err
            raise
        return len(data)

    def flush(self):
        self.file.flush()


def atomic_torch_save(obj, path):
    """`torch.save` that never leaves a half-written file at `path`; a failed write is a `WriteError`."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb", buffering=0) as f:
            writer = _WholeWrites(f)
            try:
                torch.save(obj, writer)
            except Exception:
                if writer.error is not None:
                    raise writer.error from None
                raise


def atomic_write_text(path, text):
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def missing_folders(path):
    """The folders `os.makedirs(path)` would create, deepest first."""
    folders = []
    folder = os.path.abspath(os.fspath(path))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folders.append(folder)
        folder = os.path.dirname(folder)
    return folders


def remove_empty_folders(folders):
    """Remove `folders` (deepest first) while they are empty: what a failed run created and left empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            break
