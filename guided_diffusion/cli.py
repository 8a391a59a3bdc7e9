"""Command-line plumbing shared by every script: user errors, flags, signals and exit statuses.

A mistake the user can fix (a missing folder, a flag that disagrees with a
checkpoint, a flag of the wrong type, ...) is raised as `UserError`; `run_main`
turns it into one line on stderr and exit status 2, with no traceback. The
library's own errors name parameters (`errors.ParameterError`); `flag_names`
turns them into the flag's words where a command knows which flag fed them.

A file that cannot be written (a full disk, a quota, a file-size limit, an I/O error, no permission)
is `WriteError`, raised by the atomic writers of `files` (re-exported here) and by `logger`: one
line naming the file and the cause, the temporary file removed.

Exit statuses of the scripts run through `run_main`:

    0    finished
    2    a user error (bad flag, missing or unreadable input, an output folder in use by another
         run), reported as `error: ...`
    74   a file could not be written or read (EX_IOERR): `error: cannot write PATH: no space left on
         device`; rerunning helps only once the cause is fixed
    130  stopped by SIGINT (Ctrl-C); 143 stopped by SIGTERM (`timeout`, `kill`, SLURM, Kubernetes),
         i.e. 128 + the signal number, as a shell reports a job killed by that signal. Training
         saves a complete checkpoint of the step it was on first (see `train_cli`).

Under several processes (torchrun, mpiexec) a rank that fails ends every rank promptly, each with
the failing rank's line and status (`dist_util.end_together`).
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import traceback

from .errors import ParameterError
from .files import (  # noqa: F401  (re-exported: the commands and the library import them from here)
    WriteError,
    as_write_error,
    atomic_directory,
    atomic_path,
    atomic_torch_save,
    atomic_write_text,
    missing_folders,
    os_error_cause,
    remove_empty_folders,
    writing,
)


class UserError(ValueError):
    """A problem with the user's input: reported as one line, exit status 2.

    It is a ValueError, so library callers can catch it like any bad argument.
    """


@contextlib.contextmanager
def flag_names(flags):
    """Inside the block, a library `ParameterError` of a parameter in `flags` ({parameter: flag}) is a
    UserError naming the flag instead: the command layer knows which flag fed which parameter."""
    try:
        yield
    except ParameterError as err:
        if err.parameter not in flags:
            raise
        raise UserError(err.named(flags[err.parameter])) from None


class Stopped(Exception):
    """A run that stopped early on a signal after saving its work: one line, exit status 128 + signum."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = int(signum)


IO_ERROR_STATUS = 74  # EX_IOERR of sysexits.h

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
    """Turn SIGTERM into a `Terminated` exception while the block runs (main thread only).

    A Python handler installed by the caller is left alone. An inherited "ignore" is replaced, as the
    training loop's handler replaces it: a job runner that starts its jobs with SIGTERM ignored must
    still be able to stop a sampling or segmentation run cleanly."""
    if threading.current_thread() is not threading.main_thread() or callable(signal.getsignal(signal.SIGTERM)):
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one exception; cleanup is not interrupted again
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def _report(err):
    """(the one line, the exit status) that `run_main` reports for `err`; None for an unexpected error."""
    if isinstance(err, UserError):
        return f"error: {err}", 2
    if isinstance(err, Stopped):
        return str(err), 128 + err.signum
    if isinstance(err, KeyboardInterrupt):
        signum = getattr(err, "signum", signal.SIGINT)
        return f"stopped by {signal_name(signum)} before finishing", 128 + signum
    if isinstance(err, WriteError):
        return f"error: {err}", IO_ERROR_STATUS
    if isinstance(err, OSError):
        where = f"{os.fsdecode(err.filename)}: " if err.filename is not None else ""
        return f"error: {where}{os_error_cause(err)}", IO_ERROR_STATUS
    return None


def run_main(main, *args, **kwargs):
    """Run a script's `main` with one-line reports and the exit statuses of the module docstring.

    `UserError` prints `error: ...` and exits 2; a file that cannot be written or read (`WriteError`,
    any other OSError) prints `error: ...` and exits 74; `Stopped` (work saved) prints its message and
    exits 128 + its signal; Ctrl-C or SIGTERM anywhere else prints one line and exits 130 or 143.
    Under several processes a rank that fails ends every rank, each with its line and status
    (`dist_util.end_together`), and a rank that finishes waits for the others at a last barrier.
    """
    try:
        with _one_line_argparse_errors(), _sigterm_raises(), _file_size_limit_is_an_error():
            result = main(*args, **kwargs)
            distributed = _process_group()
            if distributed is not None:
                distributed.barrier()  # a rank failing after the others finished still ends them all
            return result
    except (Exception, KeyboardInterrupt) as err:
        report = _report(err)
        distributed = _process_group()
        if distributed is not None:
            _end_every_rank(distributed, err, report)
        if report is None:
            raise
        print(report[0], file=sys.stderr)
        sys.exit(report[1])


def _process_group():
    """`dist_util` when this process is one of several ranks (torch is imported by then), else None."""
    if "torch.distributed" not in sys.modules:
        return None
    from . import dist_util

    return dist_util if dist_util.is_distributed() else None


def _end_every_rank(dist_util, err, report):
    """This rank failed with `err`: every rank prints the line of the first rank that failed and exits
    with its status; an unexpected error of this rank's own prints its traceback and exits 1."""
    with contextlib.suppress(ValueError):  # the launcher stops the others once one exits: finish first
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    own = report or (f"error: rank {dist_util.get_rank()} failed: {type(err).__name__}: {detail}", 1)
    line, status = own
    status, line = dist_util.end_together(status, line)
    if report is None and (line, status) == own:
        traceback.print_exception(err)
    else:
        print(line, file=sys.stderr, flush=True)
    dist_util.wait_for_the_others()
    sys.exit(status)


def read_json(path, flag):
    """A JSON object read from `path`; UserError naming `flag` and the path otherwise."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{flag} {path}: not a JSON file ({str(err).splitlines()[0] if str(err) else err})") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} {path}: expected a JSON object, found {type(value).__name__}")
    return value


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
