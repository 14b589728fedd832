"""Local workers: the search's trials run in N processes on this machine at once.

On a small CPU much of a trial is single-threaded Python (building the model, tracing
its train step, bookkeeping) while the other cores wait, and small tensors keep even the
training steps from using two cores well. N worker processes, each on its share of the
cores, keep every core busy. With GPUs, each worker trains on a GPU of its own. They use
KerasTuner's own chief/worker mode: this process serves the oracle on a free 127.0.0.1
port and trains nothing; each worker
(`python -m tuning.search_worker RUN_DIR ORACLE WORKER_ID THREADS`) reads the run's
settings from its `config.json`, asks the chief for trials and trains them.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.cpus import usable_cpus

ROOT = Path(__file__).resolve().parent.parent
EXIT_GRACE_S = 15.0  # a worker the oracle told to stop has this long to exit by itself


def free_local_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def visible_gpus(environ=os.environ):
    """The ids of the GPUs this process may use: CUDA_VISIBLE_DEVICES when it is set, else
    those TensorFlow sees (TensorFlow is then imported)."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        ids = [i.strip() for i in environ["CUDA_VISIBLE_DEVICES"].split(",") if i.strip()]
        # CUDA ignores an invalid id and every id after it; -1 is the usual "no GPU".
        return ids[:next((k for k, i in enumerate(ids) if i.startswith("-")), len(ids))]
    import tensorflow as tf

    return [str(k) for k in range(len(tf.config.list_physical_devices("GPU")))]


def assign_gpus(gpus, count, explicit):
    """How many workers run and the GPU of each.

    One GPU per worker: workers sharing a GPU each reserve most of its memory and run
    out of it. Without an explicit --workers, as many workers run as there are GPUs (the
    profile's count at most); with one, the user's count is kept, and workers beyond the
    GPUs share them in turn.

    Args:
        gpus: The visible GPU ids (`visible_gpus`).
        count: The --workers setting.
        explicit: Whether the user gave --workers.

    Returns:
        (workers, [CUDA_VISIBLE_DEVICES of each worker] or None without GPUs, a line
        saying how the GPUs are used or None).
    """
    if not gpus:
        return count, None, None
    if not explicit and count > len(gpus):
        count = len(gpus)
    devices = [gpus[k % len(gpus)] for k in range(count)]
    if count > len(gpus):
        note = (f"{count} local workers share {len(gpus)} GPU{'s' * (len(gpus) > 1)} "
                f"({', '.join(f'GPU {g}: {devices.count(g)}' for g in gpus)}): two on one GPU may run out of "
                f"its memory; --workers {len(gpus)} gives each its own")
    elif len(gpus) == 1:
        note = "1 GPU visible: 1 local worker trains on it (more would compete for its memory)"
    else:
        note = f"{len(gpus)} GPUs visible: one per local worker ({', '.join(f'GPU {g}' for g in devices)})"
    return count, devices, note


class LocalWorkers:
    """Starts, watches and stops the worker processes of one search.

    Args:
        count: How many workers (at most one per GPU when GPUs are visible and the
            count is the profile's: `assign_gpus`).
        log: Where to say what they do.
        gpus: The visible GPU ids (`visible_gpus`).
        explicit: Whether the user gave the count (--workers).
    """

    def __init__(self, count, log=print, gpus=(), explicit=False):
        self.count, self.devices, self.gpu_note = assign_gpus(list(gpus), count, explicit)
        self.log = log
        self.oracle = free_local_address()
        self.threads = max(1, usable_cpus() // self.count)
        self.processes = {}
        self.lost = {}

    def start(self, run_dir):
        """Starts the workers on `run_dir` (its config.json must be written)."""
        if self.gpu_note:
            self.log(self.gpu_note)
        for k in range(1, self.count + 1):
            worker_id = f"local-{k}"
            environment = dict(os.environ)
            if self.devices is not None:
                environment["CUDA_VISIBLE_DEVICES"] = self.devices[k - 1]
            self.processes[worker_id] = subprocess.Popen(
                [sys.executable, "-m", "tuning.search_worker", str(run_dir), self.oracle, worker_id,
                 str(self.threads)], cwd=ROOT, env=environment)
        self.log(f"{self.count} local workers ({self.threads} thread{'s' * (self.threads > 1)} each) "
                 f"ask the oracle at {self.oracle} for trials")

    def wait(self, serving=lambda: True, lost=lambda worker, reason: None):
        """Returns when every worker has ended the search, or when the oracle no longer
        serves (`serving()` false: the chief ended the search; `stop` then ends workers
        still waiting on it); raises if one failed.

        A worker killed by a signal is lost, not failed: `lost(worker, reason)` tells the
        chief's oracle at once, which gives its trial to another worker.
        """
        served_until = None
        while True:
            if served_until is None and not serving():
                served_until = time.time()
            running = [w for w, p in self.processes.items() if p.poll() is None]
            if running and served_until is not None and time.time() - served_until > EXIT_GRACE_S:
                self.log(f"the chief ended the search: stopping local worker{'s' * (len(running) > 1)} "
                         f"{', '.join(running)} (still on a trial the chief gave up on)")
                return
            codes = {w: p.poll() for w, p in self.processes.items()}
            failed = {w: c for w, c in codes.items() if c is not None and c > 0}
            if failed:
                raise RuntimeError(f"local worker {', '.join(f'{w} exited with {c}' for w, c in failed.items())}"
                                   " (its traceback is above)")
            for worker, code in codes.items():
                if code is not None and code < 0 and worker not in self.lost:
                    self.lost[worker] = code
                    self.log(f"local worker {worker} was killed ({signal.Signals(-code).name})")
                    lost(worker, f"was killed ({signal.Signals(-code).name})")
            if all(c is not None for c in codes.values()):
                return
            time.sleep(0.5)

    def stop(self):
        """Ends any worker still running (the chief stopped early: Ctrl-C, an error)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
