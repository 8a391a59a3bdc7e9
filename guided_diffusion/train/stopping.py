"""How a training run stops on a signal: SIGTERM (`timeout`, `kill`, SLURM, Kubernetes) or a first Ctrl-C
asks the loop to finish its step, save and stop (`graceful_stop`); a second Ctrl-C aborts."""

import contextlib
import signal


@contextlib.contextmanager
def graceful_stop(loop):
    """SIGTERM or a first Ctrl-C finishes the current step, saves, and stops; a second Ctrl-C aborts."""

    def request_stop(signum, frame):
        if loop.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        loop.stop_requested = True
        if loop.stop_signal is None:
            loop.stop_signal = signum

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: leave signals alone
            pass
    if previous:
        child_handler = deferred_worker_failures(loop)
        if child_handler is not None:
            previous[signal.SIGCHLD] = child_handler
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def deferred_worker_failures(loop):
    """While a stop is requested, a data-loader worker that died of the same signal must not raise in
    the middle of the step being finished (torch checks its workers on SIGCHLD). Installs a SIGCHLD
    handler that skips that check then; returns the handler it replaced (None if none was replaced)."""
    try:
        from torch.utils.data._utils import signal_handling

        signal_handling._set_SIGCHLD_handler()  # torch's own, installed now rather than with the first loader
    except Exception:  # not available on this platform or version
        return None
    torch_handler = signal.getsignal(signal.SIGCHLD)
    if not callable(torch_handler):
        return None

    def on_child_exit(signum, frame):
        if not loop.stop_requested:
            torch_handler(signum, frame)

    signal.signal(signal.SIGCHLD, on_child_exit)
    return torch_handler
