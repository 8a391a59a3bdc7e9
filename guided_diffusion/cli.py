"""Command-line plumbing shared by every script: user errors, signals and atomic file writes.

A mistake the user can fix (a missing folder, a flag that disagrees with a
checkpoint, a flag of the wrong type, ...) is raised as `UserError` anywhere in
the library; `run_main` turns it into one line on stderr and exit status 2, with
no traceback. Files are written under a temporary name and renamed when
complete, so a crash never leaves a partial file that looks finished.

A file that cannot be written (a full disk, a quota, a file-size limit, an I/O error, no permission)
is `WriteError`, raised by the shared writers here and in `logger`: one line naming the file and
the cause, the temporary file removed.

Exit statuses of the scripts run through `run_main`:

    0    finished
    2    a user error (bad flag, missing or unreadable input, an output folder in use by another
         run), reported as `error: ...`
    74   a file could not be written or read (EX_IOERR): `error: cannot write PATH: no space left on
         device`; rerunning helps only once the cause is fixed
    130  stopped by SIGINT (Ctrl-C); 143 stopped by SIGTERM (`timeout`, `kill`, SLURM, Kubernetes),
         i.e. 128 + the signal number, as a shell reports a job killed by that signal. Training
         saves a complete checkpoint of the step it was on first (see `train_cli`).
"""

import argparse
import contextlib
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading


class UserError(ValueError):
    """A problem with the user's input: reported as one line, exit status 2.

    It is a ValueError, so library callers can catch it like any bad argument.
    """


class Stopped(Exception):
    """A run that stopped early on a signal after saving its work: one line, exit status 128 + signum."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = int(signum)


IO_ERROR_STATUS = 74  # EX_IOERR of sysexits.h

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


class Terminated(KeyboardInterrupt):
    """Raised by `run_main`'s SIGTERM handler, so a SIGTERM unwinds (and cleans up) like Ctrl-C."""

    signum = signal.SIGTERM


def signal_name(signum):
    """'SIGTERM' for 15, and so on."""
    if signum is None:
        return "request"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def argparse_error_line(parser, message):
    """The one line a flag error prints: the message and a pointer to --help (no usage dump)."""
    return f"error: {message} (see {parser.prog} --help)"


def _parser_error(self, message):
    sys.stderr.write(argparse_error_line(self, message) + "\n")
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad flag prints one `error: ...` line and a pointer to --help."""

    error = _parser_error


def str2bool(value):
    """Parse yes/no, true/false, t/f, y/n, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def add_flags(parser, defaults, help=None, aliases=None, choices=None, switches=()):
    """The one flag builder of every command: `--key` for each entry of `defaults`.

    A flag's type follows its default: booleans take yes/no, true/false, 1/0 (`str2bool`), None
    means a string, anything else converts with the default's type. `help` maps keys to help text
    (the default is appended unless it is empty or the text already speaks of it), `aliases` to more
    spellings (["--img_size"]), `choices` to the allowed values. A boolean in `switches` may also be
    typed bare (`--guided` for `--guided True`). `parser` may be an argument group.
    """
    help, aliases, choices = help or {}, aliases or {}, choices or {}
    for key, value in defaults.items():
        kind = str if value is None else str2bool if isinstance(value, bool) else type(value)
        text = help.get(key, "")
        if value not in ("", None) and "default" not in text:
            text = f"{text} (default: {value!r})".lstrip()
        extra = dict(nargs="?", const=True) if key in switches else {}
        parser.add_argument(f"--{key}", *aliases.get(key, ()), dest=key, default=value, type=kind,
                            choices=choices.get(key), help=text, **extra)
    return parser


class _Untyped:
    def __repr__(self):
        return "<not typed>"


def explicit_flags(parser, argv=None):
    """Destinations of the options typed on the command line (any spelling), whether or not the value
    equals the default: a second parse into a namespace that already holds every destination, so
    argparse fills in no default and only what was typed replaces the placeholder."""
    argv = sys.argv[1:] if argv is None else list(argv)
    untyped = _Untyped()
    dests = vars(parser.parse_args(argv))
    typed = parser.parse_args(argv, namespace=argparse.Namespace(**{dest: untyped for dest in dests}))
    return {dest for dest, value in vars(typed).items() if value is not untyped}


@contextlib.contextmanager
def _one_line_argparse_errors():
    """Make every argparse parser created while the block runs report errors in one line."""
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _parser_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into a `Terminated` exception while the block runs (main thread, default handler only)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one exception; cleanup is not interrupted again
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _file_size_limit_is_an_error():
    """A write past the file-size limit (`ulimit -f`) fails with EFBIG, reported as one line, instead of
    SIGXFSZ killing the process (its default action) with no word and possibly a core dump."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGXFSZ"):
        yield
        return
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGXFSZ, previous)


def run_main(main, *args, **kwargs):
    """Run a script's `main` with one-line reports and the exit statuses of the module docstring.

    `UserError` prints `error: ...` and exits 2; a file that cannot be written or read (`WriteError`,
    any other OSError) prints `error: ...` and exits 74; `Stopped` (work saved) prints its message and
    exits 128 + its signal; Ctrl-C or SIGTERM anywhere else prints one line and exits 130 or 143.
    """
    try:
        with _one_line_argparse_errors(), _sigterm_raises(), _file_size_limit_is_an_error():
            return main(*args, **kwargs)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"stopped by {signal_name(signum)} before finishing", file=sys.stderr)
        sys.exit(128 + signum)
    except WriteError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(IO_ERROR_STATUS)
    except OSError as err:
        where = f"{os.fsdecode(err.filename)}: " if err.filename is not None else ""
        print(f"error: {where}{os_error_cause(err)}", file=sys.stderr)
        sys.exit(IO_ERROR_STATUS)


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


def require_dir(path, flag):
    """Raise a UserError naming `flag` unless `path` is an existing directory."""
    if not path:
        raise UserError(f"{flag} is required")
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory")
    return path


@contextlib.contextmanager
def removed_on_failure(directory, keep=None, flag=None):
    """Create `directory`; if the block fails, remove what was created in it, and it if it is new.

    Entries that were there before are never touched. `keep()`, if given, is asked at failure
    time whether the block already produced work worth keeping (e.g. a training checkpoint);
    then nothing is removed. `flag` names the option the folder came from in errors. Yields the directory.
    """
    given = os.fspath(directory)
    directory = os.path.abspath(os.fspath(directory))
    existed = os.path.isdir(directory)
    before = set(os.listdir(directory)) if existed else set()
    new_folders = missing_folders(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        where = f"{flag} {given}" if flag else given
        raise UserError(f"{where}: cannot be created ({err.strerror or err})") from None
    try:
        yield directory
    except BaseException:
        if keep is None or not keep():
            for name in set(os.listdir(directory)) - before if os.path.isdir(directory) else ():
                path = os.path.join(directory, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(path)
            remove_empty_folders(new_folders)
        raise


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
