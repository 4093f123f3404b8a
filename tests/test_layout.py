"""The architecture, checked: imports run one way between the stages, with no circle anywhere.

data/ reads nothing of the others; train/ reads data/; infer/ reads data/ and train/'s checkpoints
through train/checkpoint.py alone; the CLI and demo (phonetune/) span them all.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
STAGES = {"data": "phonetune.data", "train": "phonetune.train", "infer": "phonetune.infer"}
# What each stage may import of phonetune (besides itself and the top-level package's version).
ALLOWED = {
    "data": (),
    "train": ("phonetune.data",),
    "infer": ("phonetune.data", "phonetune.train.checkpoint"),
}


def imports_of(path: Path) -> set[str]:
    """phonetune modules that `path` imports when it runs: at module level or inside functions,
    not the annotations-only imports under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    nodes = list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("phonetune")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("phonetune"):
                # `from phonetune.train import checkpoint` imports the module phonetune.train.checkpoint
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
                found.add(node.module)
    return found


def module_name(path: Path) -> str:
    folder = path.parent.name
    package = STAGES.get(folder, "phonetune")
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def test_imports_run_one_way_between_the_stages():
    wrong = []
    for folder, package in STAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            for name in imports_of(path):
                allowed = (package, "phonetune.__version__", *ALLOWED[folder])
                if name != "phonetune" and not name.startswith(allowed):
                    wrong.append(f"{folder}/{path.name} imports {name}")
    assert wrong == []


def test_no_module_imports_itself_back_through_others():
    paths = [p for folder in (*STAGES, "phonetune") for p in sorted((ROOT / folder).glob("*.py"))]
    names = {module_name(path) for path in paths}
    graph = {module_name(path): imports_of(path) & names for path in paths}
    circles = []

    def visit(node, trail):
        for nxt in graph.get(node, ()):
            if nxt in trail:
                circles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif len(trail) < 30:
                visit(nxt, [*trail, nxt])

    for start in graph:
        visit(start, [start])
    assert circles == [], sorted(set(circles))[:5]
