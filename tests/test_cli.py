"""The command line: every documented option is honoured wherever the help allows it,
an option a command does not take is refused, and settings resolve from one table."""

import os
import re
import shlex
import signal
import time

import pytest

from cli import ROOT, assert_user_error, free_port, run_cli
from common.errors import UsageError
from hypermodel.space import SearchChoices
from tuning.cli import COMMANDS, options_of, parse, resolve_settings
from tuning.settings import BY_NAME, JOB, SETTINGS

SUBSTITUTIONS = {'"$CHIEF"': "chief", "$CHIEF": "chief", '"$RUN"': "/shared/run", "$RUN": "/shared/run",
                 "$SLURM_PROCID": "0", "$SLURM_JOB_ID": "1"}


def readme_command_lines():
    """Every `python search.py ...` command written in the README, as argv lists."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "python search.py" not in line:
                continue
            command = line.split("python search.py", 1)[1].split("#", 1)[0].rstrip(" &")
            for old, new in SUBSTITUTIONS.items():
                command = command.replace(old, new)
            lines.append(shlex.split(command.replace("'", "")))
    return lines


def resolved_value(settings, name):
    return getattr(settings.choices, name) if BY_NAME[name].in_choices else getattr(settings, name)


def test_the_readme_documents_commands():
    commands = readme_command_lines()
    assert len(commands) >= 12
    assert {parse(argv).command for argv in commands} == set(COMMANDS) | {JOB}


@pytest.mark.parametrize("argv", readme_command_lines(), ids=" ".join)
def test_every_readme_command_line_resolves_every_option_it_gives(argv, monkeypatch):
    monkeypatch.setattr("tuning.profiles.default_profile_name", lambda: "cpu")
    invocation = parse(argv)
    given = [token for token in argv if token.startswith("-")]
    allowed = set(options_of(invocation.command).values()) | {"--verbose", "--no-feature-cache"}
    assert set(given) <= allowed, f"{argv}: {set(given) - allowed} not options of {invocation.command}"
    dest_of = {flag: dest for dest, flag in options_of(invocation.command).items()}
    dest_of.update({"--verbose": "verbose", "--no-feature-cache": "feature_cache"})
    for flag in given:
        assert dest_of[flag] in invocation.options, f"{argv}: {flag} was dropped"
    if invocation.command in (JOB, "search"):
        settings = resolve_settings(invocation.options)
        for dest, value in invocation.options.items():
            assert resolved_value(settings, dest) == value, f"{argv}: {dest}"


@pytest.mark.parametrize("command", [JOB, *COMMANDS])
def test_every_option_in_help_is_honoured_before_and_after_the_command(command):
    help_text = run_cli(*([] if command == JOB else [command]), "--help").stdout
    listed = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+|-v)\b", help_text)) - {"--help", "--no-feature-cache"}
    options = options_of(command)
    assert listed == set(options.values()) | ({"--verbose"} if "verbose" in options else set()), command
    for dest, flag in options.items():
        setting = BY_NAME.get(dest)
        value = [] if setting and setting.parse in ("count", "store_true", "switch") else [
            (setting.example if setting else {"model": "export", "output": "out.csv", "port": "6007",
                                              "host": "127.0.0.1"}[dest])]
        positional = ["in.png"] if command == "predict" else []
        required = ["--model", "export"] if command == "predict" and dest != "model" else []
        name = [] if command == JOB else [command]
        after = parse([*name, *required, flag, *value, *positional])
        assert dest in after.options, f"{command} {flag}"
        if command in (JOB, "search"):
            before = parse([flag, *value, *name, *required, *positional])
            assert before.options == after.options, f"{flag} before `{command}`"


@pytest.mark.parametrize("argv, expected", [
    (["--profile", "smoke", "search"], {"profile": "smoke", "time_budget_s": 150, "train_subset": 2000}),
    (["--time-budget", "5m", "search"], {"time_budget_s": 300.0}),
    (["search", "--time-budget", "0", "--train-subset", "0"], {"time_budget_s": None, "train_subset": None}),
    (["-v", "search", "-v"], {"verbose": 2}),
    (["--profile", "smoke", "--job-time-budget", "2h", "--epochs", "3"], {"job_time_budget_s": 7200.0, "epochs": 3}),
    (["search", "--profile", "smoke", "--no-feature-cache", "--cache-budget", "512"],
     {"feature_cache": False, "cache_budget_mb": 512}),
    (["--profile", "smoke", "search", "--resolutions", "64,96", "--learning-rate", "1e-4,1e-3"],
     {"choices.resolutions": (64, 96), "choices.learning_rate": (1e-4, 1e-3), "choices.dense_units": (64, 256)}),
])
def test_flags_override_the_profile_in_any_position(argv, expected):
    settings = resolve_settings(parse(argv).options)
    for key, value in expected.items():
        owner = settings.choices if key.startswith("choices.") else settings
        assert getattr(owner, key.split(".")[-1]) == value, key


def test_defaults_come_from_the_settings_table_and_the_profile():
    settings = resolve_settings(parse(["--profile", "cpu", "search"]).options)
    assert settings.batch_size == BY_NAME["batch_size"].default == 64
    assert settings.time_budget_s == 12 * 60 and settings.job_time_budget_s == 58 * 60
    assert settings.choices.dense_units == SearchChoices().dense_units
    assert {s.name for s in SETTINGS if not s.in_choices} == set(settings.to_dict())


@pytest.mark.parametrize("argv, named", [
    (["--profile", "smoke", "export"], "--profile"),
    (["--batch-size", "32", "report"], "--batch-size"),
    (["retrain", "--batch-size", "32"], "--batch-size"),
    (["retrain", "--profile", "smoke"], "--profile"),
    (["tensorboard", "--seed", "1"], "--seed"),
    (["data", "--run-dir", "results/x"], "--run-dir"),
    (["search", "--epochs", "2"], "--epochs"),
    (["search", "--resolutions", "16"], "--resolutions"),
    (["search", "--distributed", "worker"], "--worker-id"),
    (["search", "--distributed", "worker", "--worker-id", "w1", "--overwrite"], "--overwrite"),
    (["search", "--oracle", "nonsense"], "--oracle"),
])
def test_an_option_the_command_does_not_take_is_refused(argv, named):
    with pytest.raises(UsageError, match=re.escape(named)):
        invocation = parse(argv)
        if invocation.command in (JOB, "search"):
            resolve_settings(invocation.options)


def test_refusal_through_the_real_cli_is_one_line_and_exit_2(tmp_path):
    result = run_cli("retrain", "--run-dir", tmp_path / "r", "--batch-size", "32")
    assert_user_error(result, "--batch-size")
    assert not (tmp_path / "r").exists()


def test_commands_without_run_dir_say_which_run_they_picked(tmp_path):
    results = tmp_path / "results"
    for age, name in ((100, "b-older"), (0, "a-newer")):  # the newest by time, not by name
        (results / name).mkdir(parents=True)
        (results / name / "config.json").write_text("{}")
        os.utime(results / name / "config.json", (time.time() - age, time.time() - age))
    result = run_cli("report", cwd=tmp_path)
    assert result.stdout.splitlines()[0] == f"no --run-dir given: using the newest run in results/, {'results/a-newer'}"
    assert result.returncode == 2  # its config.json is not a valid run: said in one line
    assert "config.json: not a valid run config" in result.stderr


@pytest.mark.parametrize("command, resumable, working", [
    ("search", True, "run dir:"), ("tensorboard", False, "TensorBoard at"),
])
def test_ctrl_c_says_rerun_only_where_a_rerun_resumes(tmp_path, command, resumable, working):
    """Ctrl-C once the command is at work (it has printed `working`)."""
    from cli import start_cli

    run_dir = tmp_path / "r"
    if command == "tensorboard":
        (run_dir / "tensorboard").mkdir(parents=True)
        (run_dir / "config.json").write_text('{"settings": {}, "data": {"checksum": ""}}')
    extra = ["--profile", "smoke"] if command == "search" else ["--port", str(free_port())]
    process = start_cli(command, "--run-dir", run_dir, *extra)
    out = []
    deadline = time.time() + 240
    while time.time() < deadline and not any(working in line for line in out):
        line = process.stdout.readline()
        if not line:
            break
        out.append(line)
    assert any(working in line for line in out), "".join(out)
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    out = "".join(out) + rest
    assert process.returncode == 130, out[-1000:]
    assert ("rerun the same command to resume" in out) == resumable, out[-500:]
    assert "Traceback" not in out
