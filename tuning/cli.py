"""The command line: parse (each command owns its flags), resolve settings, dispatch.

Known user errors print one line and exit 2. Options may stand before or after the
command name; an option the command does not take is refused, never ignored.
"""

import common.tensorflow_env  # noqa: F401  (before anything imports TensorFlow)

import argparse
import dataclasses
import sys
from pathlib import Path

from common.errors import UsageError, UserError
from common.native_output import quiet_import_tensorflow
from tuning.settings import BY_NAME, JOB, SETTINGS

COMMANDS = {
    "data": "load, validate and summarise a dataset",
    "search": "run or resume the hyperparameter search",
    "retrain": "two-phase retrain of the best configuration, then the test evaluation",
    "export": "export the retrained model (SavedModel, LiteRT float32/float16/int8), each scored on the test split",
    "report": "write report.md and plots",
    "predict": "classify images with an exported model",
    "tensorboard": "serve the run's TensorBoard (with HParams) on 127.0.0.1",
}
# Options of one command that are not run settings: (dest, flag, argparse keywords).
COMMAND_OPTIONS = {
    "predict": (
        ("model", "--model", dict(required=True, help="an export/ directory (SavedModel) or a .tflite file")),
        ("output", "--output", dict(help="also write the predictions to this CSV")),
    ),
    "tensorboard": (
        ("port", "--port", dict(type=int, help="default 6006")),
        ("host", "--host", dict(help="default 127.0.0.1; another address exposes it to the network")),
    ),
}
BEFORE_COMMAND = "_before_command"
# Commands that stop on Ctrl-C with work a rerun continues.
RESUMABLE_COMMANDS = (JOB, "search", "retrain")


@dataclasses.dataclass
class Invocation:
    """What the command line asked for.

    Attributes:
        command: A key of COMMANDS, or JOB.
        options: {setting or option name: value} of every option given, nothing else.
    """

    command: str
    options: dict


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line (argparse prints the usage block first)."""

    def error(self, message):
        raise UsageError(f"{message} (see `python {self.prog} --help`)")


def main(argv):
    command = JOB
    try:
        invocation = parse(argv)
        command = invocation.command
        return dispatch(invocation)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ": rerun the same command to resume" if command in RESUMABLE_COMMANDS else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130


def build_parser():
    """search.py's parser: the whole job's options, and one subparser per command."""
    parser = _Parser(
        prog="search.py",
        description="Transfer-learning hyperparameter search. No command: search → retrain → export → report.",
        argument_default=argparse.SUPPRESS,  # only what is given lands in the namespace
    )
    _add_settings(parser, JOB)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text, argument_default=argparse.SUPPRESS)
        _add_settings(command, name)
        for dest, flag, keywords in COMMAND_OPTIONS.get(name, ()):
            command.add_argument(flag, dest=dest, **keywords)
        if name == "predict":
            command.add_argument("inputs", nargs="+", help="PNG/JPEG files, or IDX/CSV/NPY files of images")
    return parser


def _add_settings(parser, command):
    for setting in SETTINGS:
        if setting.flag is None or command not in setting.commands:
            continue
        flags = [setting.flag] + (["--verbose"] if setting.flag == "-v" else [])
        described = dict(dest=setting.name, help=setting.help)
        if setting.parse == "count":
            # A subcommand's parser starts from an empty namespace: counts given before
            # the command get their own dest, added up in `parse`.
            dest = setting.name + BEFORE_COMMAND if command == JOB else setting.name
            parser.add_argument(*flags, action="count", **{**described, "dest": dest})
        elif setting.parse == "store_true":
            parser.add_argument(*flags, action="store_true", **described)
        elif setting.parse == "switch":
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **described)
        else:
            parser.add_argument(*flags, type=setting.parse, choices=setting.choices, **described)


def options_of(command):
    """{dest: flag} of every option `command` takes (its --help lists these)."""
    options = {s.name: s.flag for s in SETTINGS if s.flag and command in s.commands}
    options.update({dest: flag for dest, flag, _ in COMMAND_OPTIONS.get(command, ())})
    return options


def parse(argv):
    """Parses `argv` into an `Invocation`, refusing options the command does not take."""
    namespace = vars(build_parser().parse_args(argv))
    command = namespace.pop("command", None) or JOB
    for key in [k for k in namespace if k.endswith(BEFORE_COMMAND)]:
        name = key[: -len(BEFORE_COMMAND)]
        namespace[name] = namespace.pop(key) + namespace.get(name, 0)
    allowed = options_of(command)
    foreign = [dest for dest in namespace if dest not in allowed and dest != "inputs"]
    if foreign:
        flags = ", ".join(_flag(dest) for dest in foreign)
        raise UsageError(f"{flags}: not an option of `{command}` (see `python search.py {command} --help`)")
    return Invocation(command, namespace)


def _flag(dest):
    return BY_NAME[dest].flag if dest in BY_NAME else dest


def resolve_settings(options):
    """The run's `Settings`: defaults, then the profile, then every option given."""
    from tuning.profiles import PROFILES, default_profile_name
    from tuning.run_dir import default_run_dir
    from tuning.settings import resolve

    given = {k: v for k, v in options.items() if k in BY_NAME}
    profile = given.pop("profile", None) or default_profile_name()
    given.setdefault("run_dir", default_run_dir())
    settings = resolve(profile, PROFILES[profile], given)
    if settings.distributed and "workers" not in given:
        settings = dataclasses.replace(settings, workers=1)  # each process is one worker
    check_distributed(settings)
    return settings


def check_distributed(settings):
    """Refuses distributed-mode settings that cannot work, before any work."""
    host, _, port = settings.oracle.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--oracle must be HOST:PORT, got {settings.oracle!r}")
    if settings.distributed == "worker":
        if not settings.worker_id or "chief" in settings.worker_id:
            raise UsageError(
                f"--worker-id must be given for a worker and must not contain 'chief', got {settings.worker_id!r}"
            )
        if settings.overwrite:
            raise UsageError("--overwrite: a worker must not delete the run dir it shares with the chief")
    elif settings.worker_id:
        raise UsageError("--worker-id is for `--distributed worker` only")
    if settings.distributed and settings.workers > 1:
        raise UsageError(f"--workers {settings.workers} starts workers on this machine: it does not go with "
                         f"--distributed {settings.distributed} (start each worker yourself)")


def dispatch(invocation):
    from tuning import jobs

    command, options = invocation.command, invocation.options
    if command == "data":
        def image_settings():
            if not options.get("profile"):  # the default profile depends on the GPUs TensorFlow sees
                quiet_import_tensorflow()
            return resolve_settings(options)

        return jobs.show_data(options.get("data"), options.get("skip_bad_images", False), image_settings)
    if command == "predict":
        return jobs.predict(options["model"], options["inputs"], options.get("output"),
                            before_tensorflow=quiet_import_tensorflow)
    if command in ("tensorboard", "report", "export", "retrain"):
        from tuning.run_dir import read_config

        run_dir = existing_run_dir(options)
        read_config(run_dir)  # a directory that is no run is refused before TensorFlow loads
    # With --profile given, bad settings, data and run dirs are refused before TensorFlow
    # loads; without it, the default profile depends on the GPUs TensorFlow sees.
    settings = source = None
    if command in (JOB, "search") and options.get("profile"):
        from tuning.run_dir import check_run_dir

        settings = resolve_settings(options)
        source = jobs.load_source(settings)
        check_run_dir(settings)
    quiet_import_tensorflow()
    jobs.silence_library_warnings()
    if command == "tensorboard":
        return jobs.tensorboard(run_dir, options.get("host", "127.0.0.1"), options.get("port", 6006))
    if command == "report":
        return jobs.report(run_dir)
    if command in ("export", "retrain"):
        overrides = {k: v for k, v in options.items() if k != "run_dir"}
        return getattr(jobs, command)(run_dir, overrides)
    settings = settings or resolve_settings(options)
    run = jobs.search if command == "search" else jobs.whole_job
    return run(settings, explicit=tuple(options), source=source)


def existing_run_dir(options):
    """The --run-dir given, else the newest run in results/ (said in the first line)."""
    if "run_dir" in options:
        return Path(options["run_dir"])
    configs = list(Path("results").glob("*/config.json"))
    if not configs:
        raise UsageError("no run found in results/: pass --run-dir or run `python search.py search` first")
    newest = max(configs, key=lambda path: path.stat().st_mtime).parent
    print(f"no --run-dir given: using the newest run in results/, {newest}", flush=True)
    return newest
