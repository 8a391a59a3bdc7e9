"""Command-line plumbing shared by every script: user errors, signals and atomic file writes.

A mistake the user can fix (a missing folder, a flag that disagrees with a
checkpoint, a flag of the wrong type, ...) is raised as `UserError` anywhere in
the library; `run_main` turns it into one line on stderr and exit status 2, with
no traceback. Files are written under a temporary name and renamed when
complete, so a crash never leaves a partial file that looks finished.

Exit statuses of the scripts run through `run_main`:

    0    finished
    2    a user error (bad flag, missing or unreadable input), reported as `error: ...`
    130  stopped by SIGINT (Ctrl-C); 143 stopped by SIGTERM (`timeout`, `kill`, SLURM, Kubernetes),
         i.e. 128 + the signal number, as a shell reports a job killed by that signal. Training
         saves a complete checkpoint of the step it was on first (see `train_cli`).
"""

import argparse
import contextlib
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


def run_main(main, *args, **kwargs):
    """Run a script's `main` with one-line reports and the exit statuses of the module docstring.

    `UserError` prints `error: ...` and exits 2; `Stopped` (work saved) prints its message and exits
    128 + its signal; Ctrl-C or SIGTERM anywhere else prints one line and exits 130 or 143.
    """
    try:
        with _one_line_argparse_errors(), _sigterm_raises():
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
    new_folders = []  # the folders makedirs is about to create, deepest first
    folder = directory
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        new_folders.append(folder)
        folder = os.path.dirname(folder)
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
            for folder in new_folders:
                try:
                    os.rmdir(folder)
                except OSError:
                    break
        raise
