"""A local worker of `search --workers N` (`tuning/local_workers.py` starts N of these):
`python -m tuning.search_worker RUN_DIR ORACLE WORKER_ID THREADS` reads the run's settings
from its config.json, asks the chief at ORACLE for trials and trains them on THREADS
threads, and exits when the chief that started it is gone.
"""

import os
import sys
import threading
import time
from pathlib import Path

CHIEF_CHECK_S = 1.0  # how often a worker checks that the chief that started it is alive


def search_worker(run_dir, oracle, worker_id):
    """Trains the trials the chief at `oracle` hands out, with the run's settings from
    its config.json."""
    from tuning.jobs import feature_cache, load_source, log, materialize, search_data, use_precision
    from tuning.run_dir import read_config
    from tuning.settings import Settings
    from tuning.tuner import configure_distributed, run_search

    settings = Settings.from_dict(read_config(run_dir)["settings"])
    worker = configure_distributed("worker", oracle, worker_id)
    source = load_source(settings)
    use_precision(settings)
    data = search_data(materialize(source, settings, run_dir), settings)
    run_search(settings, data, run_dir, feature_cache=feature_cache(settings, run_dir), log=log, worker=worker)
    return 0


def exit_with_chief(worker_id, chief_pid):
    """Ends this worker, with a line saying why, once the chief that started it is gone
    (killed: it could not stop its workers), rather than wait on its oracle for an hour."""

    def watch():
        while os.getppid() == chief_pid:
            time.sleep(CHIEF_CHECK_S)
        print(f"worker {worker_id}: its chief (process {chief_pid}) is gone; exiting", file=sys.stderr, flush=True)
        os._exit(3)

    threading.Thread(target=watch, name="chief-watch", daemon=True).start()


def main(argv):
    run_dir, oracle, worker_id, threads = argv
    exit_with_chief(worker_id, os.getppid())
    from common.native_output import quiet_import_tensorflow

    quiet_import_tensorflow()  # as the chief does: no C++ start-up lines from any process
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(int(threads))
    tf.config.threading.set_inter_op_parallelism_threads(int(threads))
    from tuning.jobs import silence_library_warnings

    silence_library_warnings()
    return search_worker(Path(run_dir), oracle, worker_id)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
