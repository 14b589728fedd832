"""Runs the real CLI (`python search.py ...`) in a subprocess, as a user would."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def user_environment():
    """This environment as a user's shell would have it (no TF_CPP_MIN_LOG_LEVEL: the
    tool picks its own), with Python's output unbuffered."""
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


class StillRunning(AssertionError):
    """The CLI ran past its test's timeout."""


def run_cli(*args, timeout=600, cwd=ROOT, env=None):
    """Returns the CompletedProcess of `python search.py ARGS` (text mode).

    Past `timeout` seconds the test fails with the CLI's last output and every thread's
    stack (Python's faulthandler, on SIGABRT), and its whole process group is killed.
    """
    environment = {**user_environment(), **(env or {})}
    command = [sys.executable, "-X", "faulthandler", str(ROOT / "search.py"), *map(str, args)]
    process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to stderr
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            kill_group(process)
            stdout, stderr = process.communicate()
        kill_group(process)
        stacks = stderr[stderr.rfind("Fatal Python error"):].split("\nExtension modules:")[0]
        raise StillRunning(f"{' '.join(command[3:])} ran past {timeout} s; its output ended:\n"
                           f"{stdout[-3000:]}\nand its stacks:\n{stacks[-8000:]}") from None
    kill_group(process)  # anything it started and left behind
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_main_without_tensorflow(*args, timeout=120):
    """`search.main(ARGS)` in a fresh process that fails (exit 1) if it imported TensorFlow.
    Returns the CompletedProcess (text mode)."""
    argv = [str(arg) for arg in args]
    code = (
        "import sys, search\n"
        f"rc = search.main({argv!r})\n"
        "if 'tensorflow' in sys.modules:\n"
        "    sys.exit('TensorFlow was imported')\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=user_environment(), capture_output=True,
                          text=True, timeout=timeout)


def kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_cli(*args):
    """Starts `python search.py ARGS` in its own process group (to SIGKILL it whole).

    Ctrl-C (SIGINT) is restored to its default in the child: a test run started in the
    background inherits SIGINT ignored, and Python would then ignore it too.
    """
    environment = user_environment()
    return subprocess.Popen(
        [sys.executable, str(ROOT / "search.py"), *map(str, args)], cwd=ROOT, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(condition, timeout, interval=0.5):
    """Polls `condition()` until it is true (→ True) or `timeout` s pass (→ False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if condition():
                return True
        except (OSError, ValueError, KeyError):
            pass  # a file being replaced; poll again
        time.sleep(interval)
    return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_user_error(result, *words):
    """Exit 2, exactly one non-blank line on stderr naming the fault (every word in it),
    and no traceback anywhere."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]
