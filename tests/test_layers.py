"""The layers depend one way: common ← data_pipeline ← hypermodel ← deploy ← tuning (← tuning/cli.py).

Every import statement of every module is checked, including imports inside functions,
relative imports and literal `importlib.import_module(...)` calls:

- common/ imports only common and third-party libraries;
- data_pipeline/ imports common and itself;
- hypermodel/ (models and training) imports common, data_pipeline and itself;
- deploy/ (export, runtimes, predict) imports the three below it and itself, never the
  search or the retrain: it takes a trained model and its configuration;
- tuning/ (the search, the retrain and the CLI) imports anything below it and itself, but
  only tuning/cli.py (the top) imports tuning.cli.

And anything that compiles or fits a model lives in the models layer (hypermodel/): no
module outside it calls `.compile(...)` or `.fit(...)` (`re.compile` aside).
"""

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("common", "data_pipeline", "hypermodel", "deploy", "tuning")
MAY_IMPORT = {layer: set(ORDER[: i + 1]) for i, layer in enumerate(ORDER)}
TOP = "tuning.cli"
FITTING_METHODS = {"compile", "fit", "fit_generator", "train_on_batch"}
NOT_A_MODEL = {"re"}  # modules whose `.compile` is no model's (`re.compile`)


@functools.lru_cache
def first_party_names(root=ROOT):
    """Top-level names that resolve to this repository (everything else is third-party)."""
    names = {p.stem for p in root.glob("*.py")}
    names |= {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.py"))}
    names |= {p.stem for p in (root / "tests").glob("*.py")}  # e.g. tests/cli.py, importable as `cli` in tests
    return names


def module_name(path, root=ROOT):
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path, root=ROOT):
    """(line, statement source, imported module) for every import in `path`.

    `from package import name` yields both `package` and `package.name` (the name may be
    a submodule); relative imports are resolved against the module's package.
    """
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    lines = source.splitlines()
    for node in ast.walk(tree):
        text = " ".join(line.strip() for line in lines[node.lineno - 1: node.end_lineno]) if hasattr(node, "lineno") else ""
        if isinstance(node, ast.Import):
            found += [(node.lineno, text, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            if module:
                found.append((node.lineno, text, module))
            found += [(node.lineno, text, f"{module}.{alias.name}" if module else alias.name)
                      for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.lineno, text, node.args[0].value))
    return found


def layer_violations(path, root=ROOT, first_party=None):
    """One message per import in `path` that points up (or sideways out of) the layering."""
    first_party = first_party_names(root) if first_party is None else first_party
    me = module_name(path, root)
    layer = me.split(".")[0]
    messages = {}  # one per statement and fault: `from a.b import c` also yields a.b.c
    for line, text, target in imported_modules(path, root):
        top = target.split(".")[0]
        where = f"{path.relative_to(root)}:{line}: `{text}`"
        if top in first_party and top not in MAY_IMPORT[layer]:
            allowed = ", ".join(sorted(MAY_IMPORT[layer])) + " and third-party libraries"
            messages.setdefault((line, text, top), f"{where} imports {target}, but {layer}/ may import only {allowed}")
        elif (target == TOP or target.startswith(TOP + ".")) and me != TOP:
            messages.setdefault((line, text, TOP), f"{where} imports {target}: only {TOP.replace('.', '/')}.py, the top, may")
    return list(messages.values())


def fitting_calls(path, root=ROOT):
    """One message per `<something>.compile(...)` / `.fit(...)` call in `path`."""
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    not_models = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                  for alias in node.names if alias.name in NOT_A_MODEL}
    messages = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in FITTING_METHODS
                and not (isinstance(node.func.value, ast.Name) and node.func.value.id in not_models)):
            text = ast.get_source_segment(source, node) or node.func.attr
            messages.append(f"{path.relative_to(root)}:{node.lineno}: `{text.splitlines()[0]}` "
                            f"calls .{node.func.attr}() outside hypermodel/, the models layer")
    return messages


def layer_files(*layers, root=ROOT):
    files = sorted(p for layer in layers for p in (root / layer).rglob("*.py") if "__pycache__" not in p.parts)
    assert files, f"no Python files under {layers}"
    return files


@pytest.mark.parametrize("layer", ORDER)
def test_imports_only_point_down_the_layers(layer):
    messages = [m for path in layer_files(layer) for m in layer_violations(path)]
    assert not messages, "imports running up the layers:\n" + "\n".join(messages)


def test_nothing_outside_the_models_layer_compiles_or_fits_a_model():
    # The job (search, retrain, int8 top tuning) trains only through hypermodel.training.
    for layers in (("tuning", "deploy"), ("common", "data_pipeline")):
        messages = [m for path in layer_files(*layers) for m in fitting_calls(path)]
        assert not messages, "\n".join(messages)
    assert not fitting_calls(ROOT / "search.py")


def test_the_checks_catch_what_they_are_meant_to(tmp_path):
    """The checker itself, on a throwaway tree: each kind of violation is reported by file and line."""
    for layer in ORDER:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "__init__.py").write_text("")
    (tmp_path / "tests").mkdir()
    bad_data = tmp_path / "data_pipeline" / "cache.py"
    bad_data.write_text(
        "import numpy\n"
        "from common import atomic\n"
        "def f():\n"
        "    from hypermodel.model import build\n"  # upward, inside a function
        "    import importlib\n"
        "    importlib.import_module('tuning.tuner')\n"  # upward, by name
        "    model.compile(optimizer='adam')\n"
        "    return model.fit(x)\n"
    )
    bad_common = tmp_path / "common" / "x.py"
    bad_common.write_text("import re\nfrom . import y\nfrom .. import data_pipeline\nPATTERN = re.compile('a')\n")
    bad_tuning = tmp_path / "tuning" / "jobs.py"
    bad_tuning.write_text("from tuning import cli\nfrom hypermodel import training\n")
    bad_deploy = tmp_path / "deploy" / "export.py"
    bad_deploy.write_text("from deploy import runtimes\nfrom tuning.retrain import read_best\n")
    ok_cli = tmp_path / "tuning" / "cli.py"
    ok_cli.write_text("from tuning import jobs\nfrom . import jobs as j\n")

    assert [m.split(" imports ")[0] for m in layer_violations(bad_data, tmp_path)] == [
        "data_pipeline/cache.py:4: `from hypermodel.model import build`",
        "data_pipeline/cache.py:6: `importlib.import_module('tuning.tuner')`",
    ]
    assert [m.split(":")[1] for m in layer_violations(bad_common, tmp_path)] == ["3"]
    assert [m.split(":")[1] for m in layer_violations(bad_tuning, tmp_path)] == ["1"]
    assert "only tuning/cli.py" in layer_violations(bad_tuning, tmp_path)[0]
    assert [m.split(":")[1] for m in layer_violations(bad_deploy, tmp_path)] == ["2"]
    assert layer_violations(ok_cli, tmp_path) == []
    assert [m.split(":")[1] for m in fitting_calls(bad_data, tmp_path)] == ["7", "8"]
    assert fitting_calls(bad_common, tmp_path) == []


def module_files(root=ROOT):
    """{module name: path} of every first-party module in the layers."""
    return {module_name(p, root): p for p in layer_files(*ORDER, root=root)}


def import_cycles(root=ROOT):
    """The groups of modules that import each other, directly or through others
    (imports inside functions included), each as a sorted list of names."""
    modules = module_files(root)
    graph = {}
    for name, path in modules.items():
        # `from package import name` names a submodule when one exists, else the package.
        targets = {t if t in modules else t.rpartition(".")[0] for _, _, t in imported_modules(path, root)}
        graph[name] = {t for t in targets if t in modules and t != name and not modules[t].name == "__init__.py"}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def connect(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def test_no_two_modules_import_each_other():
    assert import_cycles() == [], "modules that import each other (inside functions too)"


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    for layer in ORDER:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "__init__.py").write_text("")
    (tmp_path / "tuning" / "jobs.py").write_text("def work():\n    from tuning.workers import start\n")
    (tmp_path / "tuning" / "workers.py").write_text("from tuning import jobs\n")
    (tmp_path / "tuning" / "report.py").write_text("from tuning.jobs import work\n")
    assert import_cycles(tmp_path) == [["tuning.jobs", "tuning.workers"]]
