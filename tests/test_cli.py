"""The command line: every documented option is honoured wherever the help allows it,
an option a command does not take is refused, and settings resolve from one table."""

import json
import os
import re
import shlex
import signal
import time

import pytest

from cli import ROOT, assert_user_error, free_port, run_cli
from common.errors import UsageError
from hypermodel.space import SearchChoices
from tuning.cli import COMMANDS, dispatch, options_of, parse, resolve_settings
from tuning.settings import BY_NAME, JOB, SETTINGS

SUBSTITUTIONS = {'"$CHIEF"': "chief", "$CHIEF": "chief", '"$RUN"': "/shared/run", "$RUN": "/shared/run",
                 "$SLURM_PROCID": "0", "$SLURM_JOB_ID": "1"}


def readme_command_lines():
    """Every `python search.py ...` command written in the README and docs/clusters.md, as argv lists."""
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "clusters.md").read_text()
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


# Each option a search records, written out here: (text given, its key in config.json's
# settings, the value recorded). Values differ from every profile's.
RECORDED = {
    "--run-dir": ("results/r7", "run_dir", "results/r7"),
    "--data": ("data/fashion-mnist", "data", "data/fashion-mnist"),
    "-v": (None, "verbose", 1),
    "--profile": ("smoke", "profile", "smoke"),
    "--skip-bad-images": (None, "skip_bad_images", True),
    "--image-budget": ("300", "image_budget_mb", 300),
    "--overwrite": (None, "overwrite", True),
    "--offline": (None, "offline", True),
    "--seed": ("7", "seed", 7),
    "--weights": ("none", "weights", "none"),
    "--backbones": ("mobilenet_v2_0.5", "choices.backbones", ["mobilenet_v2_0.5"]),
    "--resolutions": ("48,80", "choices.resolutions", [48, 80]),
    "--unfrozen-blocks": ("1,3", "choices.unfrozen_blocks", [1, 3]),
    "--heads": ("linear", "choices.heads", ["linear"]),
    "--learning-rate": ("2e-4,5e-3", "choices.learning_rate", [2e-4, 5e-3]),
    "--tuner": ("bayesian", "tuner", "bayesian"),
    "--max-epochs": ("5", "max_epochs", 5),
    "--factor": ("4", "factor", 4),
    "--workers": ("3", "workers", 3),
    "--epoch-fraction": ("0.25", "epoch_fraction", 0.25),
    "--hyperband-iterations": ("5", "hyperband_iterations", 5),
    "--max-trials": ("13", "max_trials", 13),
    "--time-budget": ("7m", "time_budget_s", 420),
    "--batch-size": ("48", "batch_size", 48),
    "--train-subset": ("1500", "train_subset", 1500),
    "--val-subset": ("300", "val_subset", 300),
    "--validation-fraction": ("0.15", "validation_fraction", 0.15),
    "--no-feature-cache": (None, "feature_cache", False),
    "--cache-budget": ("700", "cache_budget_mb", 700),
    "--epochs": ("3", "epochs", 3),
    "--job-time-budget": ("90m", "job_time_budget_s", 5400),
    "--retrain-subset": ("3000", "retrain_subset", 3000),
    "--label-smoothing": ("0.05", "label_smoothing", 0.05),
    "--ema-momentum": ("0.99", "ema_momentum", 0.99),
    "--formats": ("savedmodel,tflite", "formats", ["savedmodel", "tflite"]),
    "--max-accuracy-drop": ("0.3", "max_accuracy_drop", 0.3),
    "--max-latency-ms": ("15", "max_latency_ms", 15.0),
    "--max-model-mb": ("6", "max_model_mb", 6.0),
    "--distributed": ("chief", "distributed", "chief"),
    "--oracle": ("127.0.0.1:8123", "oracle", "127.0.0.1:8123"),
    "--worker-id": ("w1", "worker_id", "w1"),
    "--worker-timeout": ("10m", "worker_timeout_s", 600),
    "--strategy": ("mirrored", "strategy", "mirrored"),
    "--heartbeat": ("20s", "heartbeat_s", 20),
    "--class-weight": ("balanced", "class_weight", "balanced"),
    "--objective": ("macro_f1", "objective", "macro_f1"),
    "--refit-with-validation": (None, "refit_with_validation", True),
}
RETRAINING = {"--run-dir", "-v", "--image-budget", "--no-feature-cache", "--cache-budget", "--epochs",
              "--job-time-budget", "--retrain-subset", "--label-smoothing", "--ema-momentum", "--refit-with-validation"}
EXPORTING = {"--run-dir", "--formats", "--max-accuracy-drop", "--max-latency-ms", "--max-model-mb"}
# The options each command's --help documents, written out here (with --no-feature-cache,
# its pair --feature-cache).
DOCUMENTED = {
    JOB: set(RECORDED),
    "search": set(RECORDED) - (RETRAINING | EXPORTING) | {"--run-dir", "-v", "--image-budget", "--no-feature-cache",
                                                          "--cache-budget", "--max-latency-ms", "--max-model-mb",
                                                          "--refit-with-validation"},
    "retrain": RETRAINING,
    "export": EXPORTING,
    "report": {"--run-dir"},
    "predict": {"--model", "--output"},
    "tensorboard": {"--run-dir", "--port", "--host"},
    "data": {"--data", "--profile", "--skip-bad-images"},
}
# What else an option changes, by design: a profile sets many settings; a distributed
# process is one worker.
IMPLIED = {"--profile": None, "--distributed": {"workers"}}
# What an option is only valid with, and what the run it is compared with then gives.
NEEDS = {"--worker-id": (["--distributed", "worker"], ["--worker-id", "w0"])}


def recorded_settings(argv):
    """config.json's "settings" for `argv`, as a search would write them."""
    return json.loads(json.dumps(resolve_settings(parse(argv).options).to_dict()))


def flatten(settings):
    return {**{k: v for k, v in settings.items() if k != "choices"},
            **{f"choices.{k}": v for k, v in settings["choices"].items()}}


@pytest.mark.parametrize("command", sorted(DOCUMENTED))
def test_help_lists_exactly_the_documented_options(command):
    help_text = run_cli(*([] if command == JOB else [command]), "--help").stdout
    listed = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+|-v)\b", help_text)) - {"--help", "--verbose"}
    documented = DOCUMENTED[command] | ({"--feature-cache"} if "--no-feature-cache" in DOCUMENTED[command] else set())
    documented |= {"--no-refit-with-validation"} if "--refit-with-validation" in documented else set()
    assert listed == documented, (command, listed ^ documented)


@pytest.mark.parametrize("command", [JOB, "search"])
def test_every_search_option_is_recorded_in_config_json_before_or_after_the_command(command, monkeypatch):
    """Each option, given before or after the command, sets its own setting in what the run
    records (config.json) to the value written above, and nothing else."""
    monkeypatch.setattr("tuning.profiles.default_profile_name", lambda: "cpu")
    name = [] if command == JOB else [command]
    for flag in sorted(DOCUMENTED[command]):
        text, key, value = RECORDED[flag]
        needs, instead = NEEDS.get(flag, ([], []))
        baseline = flatten(recorded_settings([*name, "--run-dir", "results/r0", *needs, *instead]))
        given = [*needs, flag] if text is None else [*needs, flag, text]
        run_dir = [] if flag == "--run-dir" else ["--run-dir", "results/r0"]
        for argv in ([*name, *run_dir, *given], [*given, *run_dir, *name]):
            settings = flatten(recorded_settings(argv))
            assert settings[key] == pytest.approx(value), argv
            changed = {k for k in settings if settings[k] != baseline[k]}
            if IMPLIED.get(flag, set()) is not None:
                assert changed == {key} | IMPLIED.get(flag, set()), (argv, changed)


class Recorded(Exception):
    """Stops a command once it has recorded its settings, before any training or export."""


@pytest.mark.parametrize("command", ["retrain", "export"])
def test_retrain_and_export_record_every_option_in_config_json(command, tmp_path, monkeypatch):
    """retrain and export take a run's recorded settings, changed where an option says so:
    config.json then holds each option's value as written above, the rest as searched."""
    import tuning.jobs
    from data_pipeline import load_dataset
    from tuning.run_dir import prepare_run_dir

    monkeypatch.setattr("tuning.profiles.default_profile_name", lambda: "cpu")
    run_dir = tmp_path / "run"
    prepare_run_dir(resolve_settings(parse(["search", "--profile", "smoke", "--run-dir", str(run_dir)]).options),
                    load_dataset())
    (run_dir / "best_hparams.json").write_text(json.dumps({"trial_id": "0000", "val_accuracy": 0.8, "hyperparameters": {
        "backbone": "mobilenet_v2_0.35", "resolution": 32, "unfrozen_blocks": 0, "pooling": "avg",
        "dense_units": 64, "dropout": 0.0, "learning_rate": 1e-3, "lr_schedule": "constant", "warmup_epochs": 0,
        "optimizer": "adam", "augmentation": "none"}}))
    searched = flatten(json.loads((run_dir / "config.json").read_text())["settings"])

    def recorded(*args, **kwargs):
        raise Recorded

    monkeypatch.setattr(tuning.jobs, "materialize", recorded)
    argv = [command, "--run-dir", str(run_dir)]
    for flag in sorted(DOCUMENTED[command] - {"--run-dir"}):
        text = RECORDED[flag][0]
        argv += [flag] if text is None else [flag, text]
    with pytest.raises(Recorded):
        dispatch(parse(argv))
    settings = flatten(json.loads((run_dir / "config.json").read_text())["settings"])
    expected = {RECORDED[flag][1]: RECORDED[flag][2] for flag in DOCUMENTED[command] - {"--run-dir"}}
    assert {key: settings[key] for key in expected} == pytest.approx(expected)
    assert {k: v for k, v in settings.items() if k not in expected} == {
        k: v for k, v in searched.items() if k not in expected}


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
