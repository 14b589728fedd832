"""A screenshot of a run's TensorBoard HParams dashboard, taken with headless Chromium.

    apt-get install -y chromium          # Debian's Chromium (/usr/bin/chromium)
    python docs/screenshot_hparams.py results/<run> docs/hparams_table.png

Starts `python search.py tensorboard` on 127.0.0.1, opens the HParams dashboard (table
view: one row per trial, its hyperparameters and metrics) in headless Chromium and writes
a PNG.
"""

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1600,1000", "--virtual-time-budget=30000",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "data/plugins_listing", timeout=5).read()
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"TensorBoard did not answer at {url}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("output", help="PNG path")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    port = free_port()
    board = subprocess.Popen(
        [sys.executable, "search.py", "tensorboard", "--run-dir", args.run_dir, "--port", str(port)], cwd=ROOT,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_up(url)
        output = Path(args.output).resolve()
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={output}",
                 url + "#hparams"],
                check=True, capture_output=True, timeout=180,
            )
        print(f"wrote {output}")
    finally:
        board.terminate()
        board.wait()


if __name__ == "__main__":
    main()
