"""One process or many: the same scripts run plain, under `mpiexec -n N`, or under `torchrun`.

`setup_dist()` detects the launcher from its environment variables. Under
torchrun the usual RANK / WORLD_SIZE / MASTER_* variables are used; under an
MPI launcher rank 0 picks a free port and shares it through mpi4py. A plain
`python script.py` is a world of one and initialises nothing. The backend is
NCCL when each process has a GPU, gloo otherwise.

One rank's failure ends every rank (`end_together`, called by `cli.run_main`): the failing rank
writes its one line and exit status into the process group's key-value store, prints the line
and waits (a few seconds at most) until every rank has read it. Each other rank has a watcher
thread that looks at the store twice a second (`_watch_for_failures`): finding the line, it
prints it and ends the process with the same status, whether its main thread waits in a
collective (which, with gloo or NCCL, would not fail before the failing rank exits or times out)
or is busy elsewhere. A rank whose main thread fails by itself meanwhile (its collective lost a
peer) takes the line from the store in the same way, so that every rank reports the first failure.
"""

import contextlib
import io
import os
import pickle
import socket
import sys
import threading
import time

import blobfile as bf
import torch
import torch.distributed as dist

# Environment variables that MPI launchers set: (world size, rank, local rank).
_MPI_ENV = [
    ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"),  # MPICH / Intel MPI (hydra)
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("PMIX_SIZE", "PMIX_RANK", "PMIX_LOCAL_RANK"),
]


def _launcher_env():
    """(world_size, rank, local_rank, launcher) from the environment; world 1 when not launched."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        return int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), local, "torchrun"
    for size_key, rank_key, local_key in _MPI_ENV:
        if size_key in os.environ and rank_key in os.environ:
            rank = int(os.environ[rank_key])
            return int(os.environ[size_key]), rank, int(os.environ.get(local_key, rank)), "mpi"
    return 1, 0, 0, None


def setup_dist(backend=None):
    """Initialise torch.distributed when launched with several processes; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        return
    world_size, rank, local_rank, launcher = _launcher_env()
    if world_size <= 1:
        return
    os.environ["LOCAL_RANK"] = str(local_rank)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if launcher == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        address = "127.0.0.1" if backend == "gloo" and _single_node(comm) else socket.getfqdn()
        address, port = comm.bcast((address, _free_port()) if rank == 0 else None, root=0)
        os.environ.setdefault("MASTER_ADDR", address)
        os.environ.setdefault("MASTER_PORT", str(port))
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    _watch_for_failures()


def _single_node(comm):
    hosts = comm.allgather(socket.gethostname())
    return len(set(hosts)) == 1


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


def dev():
    """The device this process computes on: its GPU, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_state_dict(path, **kwargs):
    """Load a checkpoint; with several processes rank 0 reads the file once and shares the bytes.

    Weights only (tensors and plain data): a checkpoint's pickle never runs code.
    """
    data = None
    if get_rank() == 0:
        with bf.BlobFile(path, "rb") as f:
            data = f.read()
    if is_distributed():
        holder = [data]
        dist.broadcast_object_list(holder, src=0)
        data = holder[0]
    kwargs.setdefault("map_location", "cpu")
    kwargs["weights_only"] = True
    return torch.load(io.BytesIO(data), **kwargs)


def run_on_main_process(fn, share=True):
    """`fn()` run by rank 0 alone (e.g. a check that renames files); every process then returns its
    result (None on the others when not `share`), or raises the error it raised, so that all stop together.

    Without distribution it is just `fn()`.
    """
    if not is_distributed():
        return fn()
    value = error = None
    if get_rank() == 0:
        try:
            value = fn()
        except Exception as err:
            error = err
    holder = [(value if share else None, _picklable(error))]
    dist.broadcast_object_list(holder, src=0)
    if get_rank() == 0:
        if error is not None:
            raise error
        return value
    shared, error = holder[0]
    if error is not None:
        raise error
    return shared


def _picklable(error):
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")


def sync_params(params):
    """Copy rank 0's values of `params` (parameters or buffers) to every process."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p, 0)


def all_gather_objects(obj):
    """List of `obj` from every rank (a one-element list without distribution)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup():
    if is_distributed():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# One rank's failure ends every rank

_FAILURE_KEY = "guided_diffusion/failure"  # "STATUS\nLINE" of the first rank that failed
_ENDED_KEY = "guided_diffusion/ended"  # how many ranks are ready to exit
WATCH_INTERVAL = 0.5  # seconds between the watcher's looks at the store
WATCH_GRACE = 0.5  # seconds the watcher leaves the main thread to report a failure of its own first
END_TIMEOUT = 10.0  # seconds a failing run waits for every rank to be ready to exit
_store = None  # the default group's store, kept past the group's abort
_ending_lock = threading.Lock()
_ending = False


def _claim_ending():
    """True for the first caller in this process (the main thread or the watcher), which ends it."""
    global _ending
    with _ending_lock:
        first, _ending = not _ending, True
    return first


def _decode(value):
    status, line = value.decode().split("\n", 1)
    return int(status), line


def _watch_for_failures():
    """Start the thread that ends this rank when another one has reported a failure and this rank's
    main thread is not reporting one itself within `WATCH_GRACE` seconds: it prints the line and
    exits with the status at once (`os._exit`: the main thread may be blocked in a collective)."""
    global _store
    try:
        _store = dist.distributed_c10d._get_default_store()
        store = _store.clone()  # a connection of its own: the main thread uses the other one
    except Exception:  # a store without these calls: failures end the ranks as before
        return

    def watch():
        try:
            while not store.check([_FAILURE_KEY]):
                if _ending:
                    return
                time.sleep(WATCH_INTERVAL)
            time.sleep(WATCH_GRACE)
        except Exception:  # the store's host (rank 0, or the launcher) has gone: nothing left to watch
            return
        if _claim_ending():
            _end_process(store)

    threading.Thread(target=watch, name="failure-watch", daemon=True).start()


def _end_process(store):
    """Print the reported line, tell the failing rank this one is ready, and exit with the status."""
    try:
        status, line = _decode(store.get(_FAILURE_KEY))
    except Exception:
        status, line = 1, "error: another rank failed (its report could not be read)"
    try:
        print(line, file=sys.stderr, flush=True)
        store.add(_ENDED_KEY, 1)
    finally:
        os._exit(status)


def end_together(status, line):
    """This rank failed with `line` and exit `status`: report it to the other ranks (the first report
    wins, and every rank ends with its line and status) and abort this rank's process group (NCCL:
    so that exiting does not wait on its pending collectives). Returns the (status, line) to report;
    without a store or a process group, this rank's own. Blocks for good if the watcher thread is
    already ending the process."""
    if _store is None or not is_distributed():
        return status, line
    if not _claim_ending():
        threading.Event().wait()  # the watcher prints the line and exits
    try:
        shared = _store.compare_set(_FAILURE_KEY, "", f"{status}\n{line}")
        status, line = _decode(shared)
    except Exception:  # the store has gone with its host: this rank's own line
        pass
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return status, line


def wait_for_the_others(timeout=END_TIMEOUT):
    """After `end_together`: wait (at most `timeout` s) until every rank is ready to exit, so that the
    rank holding the store does not end before the others have read the line from it."""
    if _store is None:
        return
    deadline = time.monotonic() + timeout
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        ready = _store.add(_ENDED_KEY, 1)
        while ready < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
            ready = _store.add(_ENDED_KEY, 0)
    except Exception:  # the store has gone: the others have read it, or cannot any more
        pass
