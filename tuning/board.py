"""`search.py tensorboard`: TensorBoard over a run's logs, on 127.0.0.1 unless told otherwise."""

import time
from pathlib import Path

from common.errors import UsageError


def serve(run_dir, host="127.0.0.1", port=6006, log=print):
    """Starts TensorBoard (scalars + HParams dashboard) and blocks until interrupted."""
    from tensorboard import program

    logdir = Path(run_dir) / "tensorboard"
    if not logdir.is_dir():
        raise UsageError(f"{logdir} not found: this run has no TensorBoard logs yet")
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(logdir), "--host", host, "--port", str(port)])
    try:
        url = board.launch()
    except program.TensorBoardServerException as e:
        raise UsageError(f"cannot start TensorBoard on {host}:{port}: {e}") from None
    log(f"TensorBoard at {url} (HParams dashboard: {url}#hparams); Ctrl-C to stop", )
    while True:
        time.sleep(3600)
