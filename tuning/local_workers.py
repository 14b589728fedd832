"""Local workers: the search's trials run in N processes on this machine at once.

On a small CPU much of a trial is single-threaded Python (building the model, tracing
its train step, bookkeeping) while the other cores wait, and small tensors keep even the
training steps from using two cores well. N worker processes, each on its share of the
cores, keep every core busy. They use KerasTuner's own chief/worker mode: this process
serves the oracle on a free 127.0.0.1 port and trains nothing; each worker
(`python -m tuning.local_workers RUN_DIR ORACLE WORKER_ID THREADS`) reads the run's
settings from its `config.json`, asks the chief for trials and trains them.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_local_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class LocalWorkers:
    """Starts, watches and stops the worker processes of one search.

    Args:
        count: How many workers.
        log: Where to say what they do.
    """

    def __init__(self, count, log=print):
        self.count = count
        self.log = log
        self.oracle = free_local_address()
        self.threads = max(1, (os.cpu_count() or 1) // count)
        self.processes = {}

    def start(self, run_dir):
        """Starts the workers on `run_dir` (its config.json must be written)."""
        for k in range(1, self.count + 1):
            worker_id = f"local-{k}"
            self.processes[worker_id] = subprocess.Popen(
                [sys.executable, "-m", "tuning.local_workers", str(run_dir), self.oracle, worker_id,
                 str(self.threads)], cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        self.log(f"{self.count} local workers ({self.threads} thread{'s' * (self.threads > 1)} each) "
                 f"ask the oracle at {self.oracle} for trials")

    def wait(self):
        """Returns when every worker has ended the search; raises if one failed."""
        while True:
            codes = {w: p.poll() for w, p in self.processes.items()}
            failed = {w: c for w, c in codes.items() if c not in (None, 0)}
            if failed:
                raise RuntimeError(f"local worker {', '.join(f'{w} exited with {c}' for w, c in failed.items())}"
                                   " (its traceback is above)")
            if all(c == 0 for c in codes.values()):
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


def main(argv):
    run_dir, oracle, worker_id, threads = argv
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(int(threads))
    tf.config.threading.set_inter_op_parallelism_threads(int(threads))
    from tuning import jobs

    jobs.silence_library_warnings()
    return jobs.search_worker(Path(run_dir), oracle, worker_id)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
