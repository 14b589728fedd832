"""common/: temporaries cleaned only when provably stale, downloads that say why they failed,
$KERAS_HOME honoured for weights."""

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from common import atomic
from common.download import DownloadError, download


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_provably_stale_temporaries_are_removed(tmp_path):
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    stale = tmp_path / "tuner" / f".trial.json.{host}-{dead_pid()}.x1.tmp"
    in_progress = tmp_path / f".oracle.json.{host}-{os.getpid()}.x2.tmp"  # a live writer
    other_host = tmp_path / f".leaderboard.csv.elsewhere-{dead_pid()}.x3.tmp"  # a shared run dir
    stale_dir = tmp_path / f".export.{host}-{dead_pid()}.x4.tmp"
    foreign = tmp_path / ".notes.tmp"  # not ours at all
    stale.parent.mkdir()
    for path in (stale, in_progress, other_host, foreign):
        path.write_text("partial")
    stale_dir.mkdir()
    atomic.remove_stale_temporaries(tmp_path)
    assert not stale.exists() and not stale_dir.exists()
    assert in_progress.exists() and other_host.exists() and foreign.exists()


def test_a_writer_names_its_temporary_after_its_host_and_pid(tmp_path, monkeypatch):
    seen = []
    original = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        original(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic.write_text(tmp_path / "a.json", "{}")
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    assert seen[0].startswith(f".a.json.{host}-{os.getpid()}.") and seen[0].endswith(".tmp")


@pytest.fixture
def http_server(tmp_path):
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "weights.h5").write_bytes(b"\x89HDF-ish" * 100)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "served"), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_stores_the_file(http_server, tmp_path):
    path = download(f"{http_server}/weights.h5", tmp_path / "cache" / "weights.h5")
    assert path.read_bytes() == b"\x89HDF-ish" * 100


def test_download_failures_name_their_cause(http_server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{http_server}/missing.h5", tmp_path / "x.h5")
    port = http_server.rsplit(":", 1)[1]
    with pytest.raises(DownloadError, match="refused"):
        download(f"http://127.0.0.1:{int(port) + 1 if int(port) < 65535 else 1}/w.h5", tmp_path / "x.h5")
    with pytest.raises(DownloadError, match="no-such-host.invalid"):
        download("http://no-such-host.invalid/w.h5", tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_weights_are_found_under_keras_home(tmp_path, monkeypatch):
    from hypermodel.backbones import VENDORED_WEIGHTS, get_backbone, usable_backbones

    backbone = get_backbone("mobilenet_v2_1.0")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    usable, dropped = usable_backbones(("mobilenet_v2_1.0",), offline=True)
    assert usable == () and f"{tmp_path / 'kh' / 'models'}/" in dropped["mobilenet_v2_1.0"]
    (tmp_path / "kh" / "models").mkdir(parents=True)
    shutil.copy(VENDORED_WEIGHTS / get_backbone("mobilenet_v2_0.5").weight_file,
                tmp_path / "kh" / "models" / backbone.weight_file)
    assert usable_backbones(("mobilenet_v2_1.0",), offline=True) == (("mobilenet_v2_1.0",), {})


def test_an_exclusive_lock_makes_another_process_wait_and_dies_with_its_holder(tmp_path):
    import time
    from pathlib import Path

    lock = tmp_path / "features.lock"
    hold = ("import sys, time; sys.path.insert(0, sys.argv[1]); from common import atomic\n"
            "with atomic.exclusive(sys.argv[2]):\n    print('held', flush=True); time.sleep(float(sys.argv[3]))\n")
    root = str(Path(__file__).resolve().parent.parent)

    holder = subprocess.Popen([sys.executable, "-c", hold, root, str(lock), "1.5"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    with atomic.exclusive(lock):
        waited = time.monotonic() - started
    holder.wait(timeout=10)
    assert waited > 0.8  # it waited for the holder to finish

    holder = subprocess.Popen([sys.executable, "-c", hold, root, str(lock), "60"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # SIGKILL while holding it
    holder.wait(timeout=10)
    started = time.monotonic()
    with atomic.exclusive(lock):
        assert time.monotonic() - started < 5


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_only_the_cpus_a_process_may_run_on_are_counted():
    """Under a CPU set (`taskset -c 0`, Slurm's or Kubernetes' CPU limits) the tool's thread
    pools (tf.data maps, local workers, LiteRT) are sized to it, not to the machine."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from common.cpus import usable_cpus; print(usable_cpus())")
    pinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert pinned.stdout.strip() == "1"
    from common.cpus import usable_cpus

    assert usable_cpus() == len(os.sched_getaffinity(0))
