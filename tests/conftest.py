"""The test suite runs TensorFlow as the tool does (settings applied before it is imported),
and shares one smoke job among the files that read one."""

import dataclasses
from pathlib import Path
from subprocess import CompletedProcess

import pytest

import common.tensorflow_env  # noqa: F401


@dataclasses.dataclass(frozen=True)
class SmokeJob:
    """The smoke profile's whole job, in two runs of the real CLI.

    Attributes:
        run_dir: The run directory both runs wrote.
        search: `search --time-budget 1s`: stopped by the budget after its first trial.
        first_board: leaderboard.csv as that search left it.
        job: The whole job on the same run dir (`--time-budget 0`): the search resumed to
            its end, then retrain, export and report.
    """

    run_dir: Path
    search: CompletedProcess
    first_board: object
    job: CompletedProcess


@pytest.fixture(scope="session")
def smoke_job(tmp_path_factory):
    """One smoke job for the search, retrain, export, report and predict tests, restricted to
    configurations that fine-tune (2 or 5 blocks) so that the retrain's phase 2 really trains."""
    import pandas as pd

    from cli import run_cli

    run_dir = tmp_path_factory.mktemp("smoke_job") / "run"
    flags = ("--profile", "smoke", "--unfrozen-blocks", "2,5", "--run-dir", run_dir)
    search = run_cli("search", *flags, "--time-budget", "1s")
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    first_board = pd.read_csv(run_dir / "leaderboard.csv", dtype={"trial_id": str})
    job = run_cli(*flags, "--time-budget", "0")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    return SmokeJob(run_dir, search, first_board, job)
