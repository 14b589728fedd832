"""A chief and two workers on 127.0.0.1 under kill -9: trials completed, retried and lost.

    python benchmarks/distributed.py [--max-trials 6] [--worker-timeout 10s]

A random search (smoke profile, 48 px MobileNetV2 tops fine-tuned end to end, tens of
seconds a trial here) runs on a chief and workers w1 and w2 (`--distributed`). Once w1
is inside its second trial it is SIGKILLed and a worker w3 started; once the chief has
given w1's trial to another worker and one more trial has ended,
the chief is SIGKILLed and restarted with the same command (the workers wait for it).
Every process is ended by this script. It prints what each kill
hit and, last, one JSON line: trials completed, retried (run again after their worker
was lost) and lost (chosen by the search but never completed; the goal is 0), workers
that did not exit after the chief, and whether the leaderboard and KerasTuner's trial
records agree.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
SEARCH = ("search", "--profile", "smoke", "--tuner", "random", "--max-epochs", "1", "--train-subset", "600",
          "--val-subset", "100", "--resolutions", "48", "--unfrozen-blocks", "17", "--backbones",
          "mobilenet_v2_0.35", "--no-feature-cache", "--time-budget", "0")
DEADLINE_S = 1800  # everything this script starts is killed by then
WORKER_EXIT_S = 60  # a worker still running this long after the chief ended counts as hung


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The chief and worker processes of one search, each with its output in a file."""

    def __init__(self, run_dir, logs, max_trials, worker_timeout):
        self.command = (*SEARCH, "--run-dir", str(run_dir), "--max-trials", str(max_trials),
                        "--oracle", f"127.0.0.1:{free_port()}", "--worker-timeout", worker_timeout)
        self.run_dir, self.logs = Path(run_dir), Path(logs)
        self.processes = {}
        self.starts = 0

    def start(self, name):
        role = ("--distributed", "chief") if name == "chief" else ("--distributed", "worker", "--worker-id", name)
        self.starts += 1
        output = open(self.logs / f"{self.starts:02d}-{name}.log", "w")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "search.py", *self.command, *role], cwd=ROOT, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True)
        output.close()

    def kill(self, name):
        os.killpg(self.processes[name].pid, signal.SIGKILL)
        self.processes[name].wait()

    def kill_all(self):
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def oracle(self):
        return json.loads((self.run_dir / "tuner" / "oracle.json").read_text())

    def records(self):
        return {p.stem: json.loads(p.read_text()) for p in (self.run_dir / "trials").glob("*.json")}

    def trials(self):
        trials = {}
        for path in (self.run_dir / "tuner").glob("trial_*/trial.json"):
            trial = json.loads(path.read_text())
            trials[trial["trial_id"]] = trial
        return trials


def wait_for(condition, deadline):
    while time.time() < deadline:
        try:
            if condition():
                return True
        except (OSError, ValueError, KeyError):
            pass  # a file being replaced
        time.sleep(0.2)
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-trials", type=int, default=6)
    parser.add_argument("--worker-timeout", default="10s")
    args = parser.parse_args()
    deadline = time.time() + DEADLINE_S
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp) / "run", tmp, args.max_trials, args.worker_timeout)
        kills = []
        history = []  # (s, ongoing trials, retry queue) at each change of the oracle's state
        watching = threading.Event()

        def watch_oracle():
            while not watching.wait(0.2):
                try:
                    state = cluster.oracle()
                except (OSError, ValueError):
                    continue
                entry = (state["ongoing_trials"], state["retry_queue"])
                if not history or history[-1][1:] != entry:
                    history.append((round(time.time() - started, 1), *entry))

        threading.Thread(target=watch_oracle, daemon=True).start()
        try:
            cluster.start("chief")
            time.sleep(3)
            cluster.start("w1")
            cluster.start("w2")

            def w1_in_second_trial():
                done = cluster.records()
                ongoing = cluster.oracle()["ongoing_trials"].get("w1")
                return any(r["worker"] == "w1" for r in done.values()) and ongoing not in (None, *done)

            assert wait_for(w1_in_second_trial, deadline), "w1 never started a second trial"
            trial = cluster.oracle()["ongoing_trials"]["w1"]
            cluster.kill("w1")
            kills.append({"killed": "w1", "in_trial": trial, "at_s": round(time.time() - started)})
            print(f"killed w1 in trial {trial}", flush=True)
            cluster.start("w3")  # a new worker: w1's trial is rerun once the chief gives up on w1

            ended = len(cluster.records())
            assert wait_for(lambda: trial in cluster.oracle().get("lost_runs", {}) and len(cluster.records()) > ended,
                            deadline), "w1's trial was not given back, or no trial ended after"
            ongoing = cluster.oracle()["ongoing_trials"]
            cluster.kill("chief")
            kills.append({"killed": "chief", "trials_ended": len(cluster.records()), "in_flight": ongoing,
                          "at_s": round(time.time() - started)})
            print(f"killed the chief with {len(cluster.records())} trials ended, in flight {ongoing}", flush=True)
            cluster.start("chief")  # the workers wait for it and go on

            cluster.processes["chief"].wait(timeout=max(1, deadline - time.time()))
            hung = [] if wait_for(lambda: all(p.poll() is not None for p in cluster.processes.values()),
                                  time.time() + WORKER_EXIT_S) else [
                name for name, p in cluster.processes.items() if p.poll() is None]
        finally:
            cluster.kill_all()
        watching.set()
        codes = {name: p.returncode for name, p in cluster.processes.items()}
        if hung:
            print("oracle states (s, ongoing, retry queue):", *history, sep="\n", flush=True)
        for log in sorted(Path(tmp).glob("*.log")):
            name = log.stem[3:]
            if name in hung or codes[name] not in (0, -signal.SIGKILL):
                print(f"{log.name}:\n{log.read_text()[-3000:]}", flush=True)
        board = pd.read_csv(cluster.run_dir / "leaderboard.csv", dtype={"trial_id": str}, keep_default_na=False)
        trials = cluster.trials()
        chosen = cluster.oracle()["start_order"]
        completed = set(board.loc[board["status"] == "COMPLETED", "trial_id"])
        consistent = set(trials) == set(board["trial_id"]) and all(
            trials[row.trial_id]["status"] == row.status for row in board.itertuples() if row.status != "REJECTED")
        print(json.dumps({
            "max_trials": args.max_trials,
            "worker_timeout": args.worker_timeout,
            "trials_chosen": len(chosen),
            "trials_completed": len(completed),
            "trials_retried": int((board["retried"] != "").sum()),
            "trials_lost": len([t for t in chosen if t not in completed]),
            "exit_codes": codes,
            "hung_workers": hung,  # still running WORKER_EXIT_S after the chief ended (then killed)
            "kills": kills,
            "leaderboard_consistent": consistent,
            "wall_s": round(time.time() - started),
        }))


if __name__ == "__main__":
    main()
