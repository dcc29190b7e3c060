"""The layering of the code: scripts on top, platy/ below, nothing calls back up (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in REPO.glob("*.py"))
# modules every layer may use: they import nothing of the project
FOUNDATION = ("platy/cli.py", "platy/files.py", "platy/checks.py")
# finetune.py's stages: the recipe that orders them and the modules it runs
TRAINING_STAGES = ("config", "plan", "recipe", "objective", "lora", "loop", "arguments", "publish")


def module_name(path):
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def imported_modules(path):
    """Every module name path imports, at any depth of the file (lazy imports inside functions too);
    relative imports are read as the absolute names they stand for."""
    package = module_name(path).split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module",
            "__import__",
        ):
            names += [arg.value for arg in node.args[:1] if isinstance(arg, ast.Constant)]
    return names


def project_files(folder):
    return sorted((REPO / folder).rglob("*.py"))


def entry_name(script):
    """The function a script hands to cli.run: the only name of a script others may use."""
    tree = ast.parse((REPO / f"{script}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "run" and node.args:
            if isinstance(node.args[0], ast.Name):
                return node.args[0].id
    raise AssertionError(f"{script}.py does not end with cli.run(entry)")


def test_the_scripts_are_the_five_tools():
    assert SCRIPTS == ["evaluate", "finetune", "inference", "merge", "refine"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_script_imports_another(script):
    others = set(SCRIPTS) - {script}
    assert not others & set(imported_modules(REPO / f"{script}.py"))


def test_no_module_in_platy_imports_a_script():
    for path in project_files("platy"):
        hits = set(SCRIPTS) & {name.split(".")[0] for name in imported_modules(path)}
        assert not hits, f"{path.relative_to(REPO)} imports {sorted(hits)}"


@pytest.mark.parametrize("module", FOUNDATION)
def test_the_foundation_imports_nothing_of_the_project(module):
    project = [name for name in imported_modules(REPO / module) if name.split(".")[0] == "platy"]
    assert not project, f"{module} imports {project}"


def test_data_does_not_import_training():
    for path in project_files("platy/data"):
        upward = [name for name in imported_modules(path) if name.startswith("platy.train")]
        assert not upward, f"{path.relative_to(REPO)} imports {upward}"


def test_only_stages_import_stages():
    """A script's stages (flag check, resolve, the steps it calls) sit above the modules that do the work."""
    stage_modules = [module_name(p) for p in project_files("platy") if p.name.endswith("_stages.py")]
    stage_modules += [f"platy.train.{name}" for name in TRAINING_STAGES]
    assert len(stage_modules) == 4 + len(TRAINING_STAGES)
    for path in project_files("platy"):
        if module_name(path) in stage_modules:
            continue
        upward = [name for name in imported_modules(path) if any(name.startswith(m) for m in stage_modules)]
        assert not upward, f"{path.relative_to(REPO)} imports {upward}"


def test_tests_and_benchmarks_use_only_a_scripts_entry():
    """A test or benchmark may run a script's entry (cli.call) but not reach into its internals."""
    entries = {script: entry_name(script) for script in SCRIPTS}
    for path in project_files("tests") + project_files("bench"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname or a.name: a.name for a in node.names if a.name in entries})
            elif isinstance(node, ast.ImportFrom) and node.module in entries:
                names = [a.name for a in node.names]
                assert names == [entries[node.module]], f"{path.name} imports {names} from {node.module}.py"
        imported = [name for name in imported_modules(path) if name in entries]
        assert all(name in aliases.values() for name in imported), f"{path.name} imports {imported} by name"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                script = aliases[node.value.id]
                assert node.attr == entries[script], f"{path.name} uses {script}.{node.attr}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "vars", "setattr"):
                names = [a.id for a in node.args[:1] if isinstance(a, ast.Name)]
                assert not set(names) & set(aliases), f"{path.name} reaches into {names[0]} with {node.func.id}"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("setattr", "patch"):
                targets = [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                patched = [name for name in targets if name.split(".")[0] in entries]
                assert not patched, f"{path.name} patches {patched[0]} inside a script"
