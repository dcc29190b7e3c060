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


def test_tests_and_benchmarks_import_no_script():
    """A test or benchmark runs a script through platy.cli (script_entry, then call or entry_defaults), never by
    importing it: a script is its command line, and what tests share with it lives in platy/."""
    offenders = []
    for path in project_files("tests") + project_files("bench"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = sorted({name.split(".")[0] for name in imported_modules(path)} & set(SCRIPTS))
        for node in ast.walk(tree):  # monkeypatch.setattr("merge.x", ...) and patch("merge.x") import it too
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("setattr", "patch"):
                targets = [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                names += [f"{name} (patched)" for name in targets if name.split(".")[0] in SCRIPTS]
        if names:
            offenders.append(f"{path.relative_to(REPO)} imports {', '.join(names)}")
    assert not offenders, (
        "tests and benchmarks run a script through cli.script_entry(name), never import it: " + "; ".join(offenders)
    )


def find_circle(graph):
    """The first import circle of graph ({module: the modules it imports}) as [a, b, ..., a], or None."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        path.append(module)
        circle = next(filter(None, map(visit, graph.get(module, ()))), None)
        path.pop()
        done.add(module)
        return circle

    return next(filter(None, map(visit, sorted(graph))), None)


def import_graph():
    """{module: the project modules it imports} over platy/, lazy imports inside functions included; a package
    is its __init__.py, and `from platy.x import y` imports platy.x.y too where that is a module."""
    modules = {module_name(path).removesuffix(".__init__"): path for path in project_files("platy")}
    return {
        module: sorted({name for name in imported_modules(path) if name in modules and name != module})
        for module, path in modules.items()
    }


def test_the_circle_finder():
    assert find_circle({"a": ["b", "d"], "b": ["c"], "c": ["a"], "d": []}) == ["a", "b", "c", "a"]
    assert find_circle({"x": ["b"], "b": ["c"], "c": ["b"]}) == ["b", "c", "b"]
    assert find_circle({"a": ["b", "c"], "b": ["c"], "c": [], "d": ["a", "c"]}) is None
    graph = import_graph()
    assert "platy.train.lora" in graph["platy.train.recipe"]  # from platy.train import loop, lora, publish
    assert "platy.merging" in graph["platy.merge_stages"]


def test_no_import_circle_in_platy():
    """Imports go down: when two modules need each other, what they share moves below both."""
    circle = find_circle(import_graph())
    assert circle is None, f"import circle: {' -> '.join(circle)}; move what they share into a module below both"


PACKAGES = ("platy", "platy.data", "platy.train")  # __init__.py files: nothing in them


def module_of(word):
    return "platy." + word.replace("/", ".")


def layer_picture():
    """docs/architecture.md's picture of the layers: ({module: row index, 0 at the top}, {(a, b): a may
    import b along an arrow of its row})."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("## Layering", 1)[1].split("```", 2)[1]
    rows, along, row = {}, set(), -1
    for line in block.splitlines():
        words = line.split()
        if not words or words == ["│"]:
            continue
        if not line.startswith(" "):  # a new row, under its label
            row += 1
            words = words[1:]
        rows.update({module_of(w): row for w in words if w != "→" and not w.endswith(".py")})
        for start in range(len(words)):  # a -> b -> c: a may import b and c, b may import c
            for end in range(start + 2, len(words), 2):
                if any(words[k] != "→" for k in range(start + 1, end, 2)):
                    break
                along.add((module_of(words[start]), module_of(words[end])))
    return rows, along


def test_the_picture_of_the_layers_is_true():
    """Every module of platy/ is in docs/architecture.md's picture, and every import goes down it or along an
    arrow of its row."""
    rows, along = layer_picture()
    graph = {m: deps for m, deps in import_graph().items() if m not in PACKAGES}
    assert set(graph) == set(rows), f"in the code, not the picture: {set(graph) - set(rows)}; " + (
        f"in the picture, not the code: {set(rows) - set(graph)}"
    )
    wrong = [
        f"{a} -> {b}"
        for a, deps in graph.items()
        for b in deps
        if b not in PACKAGES and not (rows[b] > rows[a] or (rows[b] == rows[a] and (a, b) in along))
    ]
    assert wrong == [], f"imports against docs/architecture.md's picture: {wrong}"


def defined_names(path):
    """Top-level names of a module, and Class.attribute for its classes' functions and fields."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AnnAssign)):
                    names.add(f"{node.name}.{getattr(item, 'name', None) or item.target.id}")
    return names


def test_the_names_in_architecture_md_exist():
    """Each `name` after a `platy/...py` in docs/architecture.md's tables is defined in that module."""
    import re

    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        module = None
        for word in re.findall(r"`([^`]+)`", line):
            if re.fullmatch(r"platy/[\w/]+\.py", word):
                module = REPO / word
                assert module.is_file(), f"docs/architecture.md names {word}, which does not exist"
                names = defined_names(module)
            elif module and re.fullmatch(r"[A-Za-z_]\w*(\.\w+)?", word):
                if word not in names and ("." not in word or word.split(".")[0] in names):
                    missing.append(f"{module.relative_to(REPO)}: {word}")
    assert missing == [], f"docs/architecture.md names what its module does not define: {missing}"
