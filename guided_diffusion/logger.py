"""Run logger in the openai style: key-value rows plus free text.

`configure(dir)` chooses the output directory and formats; `logkv` / `logkv_mean`
accumulate values; `dumpkvs` writes one row to every format: the terminal
(`stdout`), `log.txt` (`log`), `progress.csv` (`csv`), `progress.json`
(`json`) and TensorBoard (`tensorboard`, if installed). `log(...)` writes free
text to the terminal and `log.txt`. Only rank 0 writes the key-value formats;
other ranks keep a `log-rankNNN.txt` of their own text. A file that cannot be written (full disk,
quota, I/O error) is a `files.WriteError` naming it.
"""

import csv
import datetime
import json
import os
import sys
import tempfile
from collections import defaultdict

from .files import atomic_path, writing

DEFAULT_FORMATS = "stdout,log,csv"


class _TextOutput:
    """Aligned key/value table and free text, to a stream or a file."""

    def __init__(self, stream_or_path):
        if isinstance(stream_or_path, str):
            self.name = stream_or_path
            with writing(self.name):
                # Unbuffered bytes: a write that fails leaves nothing behind to fail again at exit.
                self.file = open(stream_or_path, "ab", buffering=0)
            self.owns_file = True
        else:
            self.name = getattr(stream_or_path, "name", "<stream>")
            self.file = stream_or_path
            self.owns_file = False

    def write_kvs(self, kvs):
        if not kvs:
            return
        rows = [(str(k), _format_value(v)) for k, v in sorted(kvs.items())]
        kwidth = max(len(k) for k, _ in rows)
        vwidth = max(len(v) for _, v in rows)
        line = "-" * (kwidth + vwidth + 7)
        out = [line] + [f"| {k:<{kwidth}} | {v:<{vwidth}} |" for k, v in rows] + [line]
        self._write("\n".join(out) + "\n")

    def write_text(self, text):
        self._write(text + "\n")

    def _write(self, text):
        with writing(self.name):
            if self.owns_file:
                data = memoryview(text.encode())
                while data:
                    data = data[self.file.write(data):]
            else:
                self.file.write(text)
                self.file.flush()

    def close(self):
        if self.owns_file:
            self.file.close()


class _CSVOutput:
    """progress.csv; rewrites the header (and pads old rows) when new keys appear."""

    def __init__(self, path):
        self.path = path
        self.keys = []
        if os.path.exists(path):  # resumed run: keep appending under the existing header
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            self.keys = list(header)

    def write_kvs(self, kvs):
        new_keys = [k for k in sorted(kvs) if k not in self.keys]
        if new_keys or not os.path.exists(self.path):
            self._rewrite_with_keys(self.keys + new_keys)
        with writing(self.path), open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_csv_value(kvs.get(k)) for k in self.keys])

    def _rewrite_with_keys(self, keys):
        old_rows = []
        if os.path.exists(self.path):
            with open(self.path, newline="") as f:
                old_rows = list(csv.DictReader(f))
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(keys)
                for row in old_rows:
                    writer.writerow([row.get(k, "") for k in keys])
        self.keys = keys

    def close(self):
        pass


class _JSONOutput:
    def __init__(self, path):
        self.path = path

    def write_kvs(self, kvs):
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps({k: _json_value(v) for k, v in kvs.items()}) + "\n")

    def close(self):
        pass


class _TensorBoardOutput:
    def __init__(self, directory):
        from torch.utils.tensorboard import SummaryWriter  # needs the optional `tensorboard` package

        self.writer = SummaryWriter(directory)
        self.step = 0

    def write_kvs(self, kvs):
        step = int(kvs.get("step", self.step))
        for k, v in kvs.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()
        self.step = step + 1

    def close(self):
        self.writer.close()


def _format_value(v):
    if isinstance(v, float):
        return f"{v:<8.3g}"
    return str(v)


def _csv_value(v):
    return "" if v is None else v


def _json_value(v):
    if hasattr(v, "item"):
        return v.item()
    return v


def _make_output(fmt, directory, rank_suffix):
    if fmt == "stdout":
        return _TextOutput(sys.stdout)
    if fmt == "log":
        return _TextOutput(os.path.join(directory, f"log{rank_suffix}.txt"))
    if fmt == "csv":
        return _CSVOutput(os.path.join(directory, f"progress{rank_suffix}.csv"))
    if fmt == "json":
        return _JSONOutput(os.path.join(directory, f"progress{rank_suffix}.json"))
    if fmt == "tensorboard":
        return _TensorBoardOutput(os.path.join(directory, f"tb{rank_suffix}"))
    raise ValueError(f"unknown log format {fmt!r} (choose from stdout, log, csv, json, tensorboard)")


class Logger:
    """Accumulates key-values between `dumpkvs` calls and fans them out to the outputs."""

    def __init__(self, directory, outputs):
        self.dir = directory
        self.outputs = outputs
        self.values = {}
        self.mean_sums = defaultdict(float)
        self.mean_counts = defaultdict(int)

    def logkv(self, key, value):
        self.values[key] = value

    def logkv_mean(self, key, value):
        self.mean_sums[key] += float(value)
        self.mean_counts[key] += 1

    def dumpkvs(self):
        row = dict(self.values)
        for key, total in self.mean_sums.items():
            row[key] = total / self.mean_counts[key]
        for out in self.outputs:
            if hasattr(out, "write_kvs"):
                out.write_kvs(row)
        self.values.clear()
        self.mean_sums.clear()
        self.mean_counts.clear()
        return row

    def log(self, *args):
        text = " ".join(str(a) for a in args)
        for out in self.outputs:
            if hasattr(out, "write_text"):
                out.write_text(text)

    def close(self):
        for out in self.outputs:
            out.close()


_current = Logger(None, [_TextOutput(sys.stdout)])


def configure(dir=None, format_strs=None, rank=None):
    """Send logs to `dir` (else $OPENAI_LOGDIR, else /tmp/openai-<time>) in the given formats."""
    global _current
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR") or os.path.join(
            tempfile.gettempdir(), datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        )
    dir = os.path.expanduser(dir)
    if rank is None:
        from . import dist_util

        rank = dist_util.get_rank()
    if format_strs is None:
        format_strs = os.getenv("OPENAI_LOG_FORMAT", DEFAULT_FORMATS).split(",")
    if rank != 0:
        format_strs = ["log"]
    os.makedirs(dir, exist_ok=True)
    rank_suffix = "" if rank == 0 else f"-rank{rank:03d}"
    _current.close()
    _current = Logger(dir, [_make_output(f.strip(), dir, rank_suffix) for f in format_strs if f.strip()])
    return _current


def get_dir():
    return _current.dir


def logkv(key, value):
    _current.logkv(key, value)


def logkv_mean(key, value):
    _current.logkv_mean(key, value)


def logkvs(values):
    for key, value in values.items():
        _current.logkv(key, value)


def dumpkvs():
    return _current.dumpkvs()


def log(*args):
    _current.log(*args)


def close():
    _current.close()
