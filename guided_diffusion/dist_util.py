"""One process or many: the same scripts run plain, under `mpiexec -n N`, or under `torchrun`.

`setup_dist()` detects the launcher from its environment variables. Under
torchrun the usual RANK / WORLD_SIZE / MASTER_* variables are used; under an
MPI launcher rank 0 picks a free port and shares it through mpi4py. A plain
`python script.py` is a world of one and initialises nothing. The backend is
NCCL when each process has a GPU, gloo otherwise.
"""

import io
import os
import pickle
import socket

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
