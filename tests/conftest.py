"""The test suite runs TensorFlow as the tool does (settings applied before it is imported),
and shares one smoke job among the files that read one."""

import dataclasses
import gzip
import os
from pathlib import Path
from subprocess import CompletedProcess

import pytest

import common.tensorflow_env  # noqa: F401


@dataclasses.dataclass(frozen=True)
class SmokeJob:
    """The smoke profile's whole job, in two runs of the real CLI.

    Attributes:
        data: The dataset folder both runs read (`fashion_slice`: 20 000 training images, 2 000 test).
        run_dir: The run directory both runs wrote.
        search: `search --time-budget 1s`: stopped by the budget after its first trial.
        first_board: leaderboard.csv as that search left it.
        job: The whole job on the same run dir (`--time-budget 0`): the search resumed to
            its end, then retrain (two epochs a phase), export and report.
    """

    data: Path
    run_dir: Path
    search: CompletedProcess
    first_board: object
    job: CompletedProcess


SMOKE_TRAIN_IMAGES = 20000
SMOKE_TEST_IMAGES = 2000


def fashion_slice(folder, test_images, train_images=None):
    """Fashion-MNIST as IDX files in `folder`: the first `test_images` of its test split
    (about as many of each class), the first `train_images` of its training split (default:
    the vendored file whole), its class names.

    Args:
        folder: Folder to create.
        test_images, train_images: How many images of each split to keep.
    """
    from data_pipeline.sources import FASHION_MNIST_CLASSES, VENDORED_DIR

    folder.mkdir(parents=True)
    for split, count in (("train", train_images), ("t10k", test_images)):
        for kind, dims in (("images-idx3", 3), ("labels-idx1", 1)):
            name = f"{split}-{kind}-ubyte"
            if count is None:
                (folder / f"{name}.gz").symlink_to(VENDORED_DIR / f"{name}.gz")
                continue
            data = gzip.decompress((VENDORED_DIR / f"{name}.gz").read_bytes())
            header = bytearray(data[: 4 + 4 * dims])
            header[4:8] = count.to_bytes(4, "big")
            item_bytes = 28 * 28 if dims == 3 else 1
            (folder / name).write_bytes(bytes(header) + data[len(header) : len(header) + count * item_bytes])
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in FASHION_MNIST_CLASSES))
    return folder


@pytest.fixture(scope="session")
def smoke_job(tmp_path_factory):
    """One smoke job for the search, retrain, export, report and predict tests, restricted to
    configurations that fine-tune (2 or 5 blocks) so that the retrain's phase 2 really trains.

    It reads the first 20 000 of Fashion-MNIST's training images and 2 000 of its test images
    (the retrain validates on 2 000 images instead of 6 000, several times; the test split
    is scored by the retrain, by each export format and again by the tests that check those
    scores), and its retrain trains two epochs a phase (`--epochs 2`), enough to show that
    both phases train; the search and the exports' conversions are the profile's own.
    """
    import pandas as pd

    from cli import run_cli

    data = fashion_slice(tmp_path_factory.mktemp("fashion") / "fashion", SMOKE_TEST_IMAGES, SMOKE_TRAIN_IMAGES)
    run_dir = tmp_path_factory.mktemp("smoke_job") / "run"
    flags = ("--profile", "smoke", "--data", data, "--unfrozen-blocks", "2,5", "--run-dir", run_dir)
    search = run_cli("search", *flags, "--time-budget", "1s")
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    first_board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str})
    job = run_cli(*flags, "--time-budget", "0", "--epochs", "2")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    return SmokeJob(data, run_dir, search, first_board, job)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """With pytest-xdist's `--dist loadgroup` (pytest.ini), each worker process runs whole
    groups: the tests that read the shared smoke job together (it is set up once), every
    other file's tests together (their module fixtures are set up once)."""
    for item in items:
        group = "smoke_job" if "smoke_job" in item.fixturenames else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_configure(config):
    """Each pytest-xdist worker process keeps to its own share of the CPUs, and so do the
    processes it starts, which size their thread pools to it (TensorFlow's included). On
    2 cores, two workers each running 2-thread TensorFlow wait on each other's threads: the
    suite took 18.6 min that way, 15.4 min pinned (benchmarks/RESULTS.md §12)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker and count and len(cpus) >= int(count):
        os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw"))::int(count)])
