"""One run per output folder: an exclusive lock that a second run on the same folder meets at once.

A re-queued cluster job can start while the first one still runs; both writing checkpoints (or
samples) into one folder would interleave them. Training holds the lock of its `--save_dir` for its
whole life, sampling the lock of its output folder; a second run stops before writing anything, with
one line naming the holder and exit status 2:

    error: --save_dir runs/ddpm is in use by another run: PID 4242 on host node17, since
    2025-03-01 12:00:03 (lock file runs/.ddpm.lock); wait for it to end, or choose another --save_dir

The lock is an OS file lock (`fcntl.flock`) on a small file beside the folder, `.NAME.lock` in its
parent: beside it, so that taking the lock creates nothing in a folder that does not exist yet, and
so that a folder written whole and renamed into place (`cli.atomic_directory`) does not take the lock
file away. The kernel releases the lock when its process ends, however it ends (kill -9, a node's
out-of-memory killer), so a crash never leaves a stale lock. The file names the holder (host, PID,
start time) and is removed when the run ends.

On a file system without working flock (some NFS or Lustre mounts answer ENOLCK or EOPNOTSUPP), the
file's existence is the lock. It is stale, and taken over, when its holder ran on this host and is
no longer alive, or when it has not been refreshed for `STALE_AFTER_S` seconds (the holder touches
it every `HEARTBEAT_S` seconds).

Wrapping an output folder, e.g. segmentation outputs written with `cli.atomic_directory`:

    from guided_diffusion.run_lock import folder_lock

    with folder_lock(args.out_dir, "--out_dir"):
        with atomic_directory(args.out_dir) as tmp:
            ...  # write the outputs into tmp

Under torchrun / mpiexec every process calls `folder_lock` at the same point: rank 0 takes the
lock, and every process raises the same error when it is held.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time

from . import dist_util
from .cli import UserError, missing_folders, remove_empty_folders

STALE_AFTER_S = 600
HEARTBEAT_S = 60
# What flock answers on a file system that does not support it.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class FolderInUse(UserError):
    """The folder is locked by another run: one line naming it, exit status 2."""


def lock_file_of(folder):
    """The lock file of `folder`: `.NAME.lock` beside it (beside the real folder, so that every spelling
    of it, through symbolic links too, meets the same lock)."""
    folder = os.path.realpath(os.fspath(folder))
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.lock")


@contextlib.contextmanager
def folder_lock(folder, flag="--save_dir"):
    """Hold the exclusive lock of `folder` while the block runs (see the module docstring).

    A folder locked by another run raises `FolderInUse` naming `flag`, the holder and the lock file.
    Folders created to hold the lock file are removed again afterwards if they are left empty. Under
    several processes call it on every rank: rank 0 locks.
    """
    lock = dist_util.run_on_main_process(lambda: _Lock(folder, flag), share=False)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _holder_line(flag, folder, holder, lock_path):
    if holder:
        who = (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
               f"since {holder.get('since', '?')}")
    else:
        who = "a process that has not said which yet"
    return (f"{flag} {folder} is in use by another run: {who} (lock file {lock_path}); "
            f"wait for it to end, or choose another {flag}")


def _process_start(pid):
    """When process `pid` started (clock ticks since boot, from /proc), to tell a reused PID; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid, start):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return start is None or _process_start(pid) in (None, start)


def flock_works(directory):
    """Whether the file system of `directory` supports flock (probed on the directory, creating nothing)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError as err:
        return err.errno not in _NO_FLOCK
    finally:
        os.close(fd)


class _Lock:
    """The held lock of one folder (taken when made)."""

    def __init__(self, folder, flag):
        self.folder = os.fspath(folder)
        self.flag = flag
        self.path = lock_file_of(folder)
        parent = os.path.dirname(self.path)
        self.created = missing_folders(parent)
        self.fd = None
        self.heartbeat = None
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(),
                         "since": time.strftime("%Y-%m-%d %H:%M:%S"), "process_start": _process_start(os.getpid())}
        try:
            os.makedirs(parent, exist_ok=True)
            if flock_works(parent):
                self._take_flock()
            else:
                self._take_file()
        except OSError as err:
            remove_empty_folders(self.created)
            raise UserError(f"{flag} {self.folder}: cannot create its lock file {self.path} "
                            f"({err.strerror or err})") from None
        except BaseException:
            remove_empty_folders(self.created)
            raise

    def _in_use(self):
        return FolderInUse(_holder_line(self.flag, self.folder, self._read_holder(), self.path))

    def _read_holder(self):
        for _ in range(20):  # the holder may be writing its name this very moment
            try:
                with open(self.path) as f:
                    return json.load(f)
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                time.sleep(0.05)
        return None

    def _write_identity(self, fd):
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.identity) + "\n").encode(), 0)

    # -- with flock ----------------------------------------------------------------------------

    def _take_flock(self):
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._in_use() from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us removes the file as it lets go: a lock on a removed file is no lock.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                self._write_identity(fd)
                return
            os.close(fd)
        raise self._in_use()

    # -- without flock: the file's existence is the lock --------------------------------------------

    def _take_file(self):
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self._stale(self._read_holder()):
                    raise self._in_use() from None
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            self.fd = fd
            self._write_identity(fd)
            self.heartbeat = _Heartbeat(self.path)
            return
        raise self._in_use()

    def _stale(self, holder):
        """Whether the lock file of `holder` (None: unreadable) is left over from a run that is gone."""
        if holder and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _alive(holder["pid"], holder.get("process_start"))
        try:
            return time.time() - os.stat(self.path).st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            return True

    def release(self):
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.fd is not None:
            # Removed while still held, so that the next run finds no file, or its own.
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                    os.remove(self.path)
            os.close(self.fd)
            self.fd = None
        remove_empty_folders(self.created)


class _Heartbeat:
    """Touches the lock file every HEARTBEAT_S seconds, so that other hosts see its holder is alive."""

    def __init__(self, path):
        self.path = path
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lock-heartbeat", daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def stop(self):
        self.done.set()
        self.thread.join()
