"""The library's layout: folders named after the wings, imports in one direction, jobs that start light."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
# Each wing may import the shared modules and the wings before it in this order, never one after it.
WINGS = ("cluster", "data", "tracking", "train", "scoring", "experiments")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _wing(module: str) -> str:
    """`shared` for pipeline/*.py, else the subpackage's name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "shared"


def _imports() -> dict[str, set[str]]:
    """module → the pipeline modules it imports (anywhere in it, function-level imports too)."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        module = _module(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    found[module].add(
                        target if (ROOT / target.replace(".", "/")).with_suffix(".py").exists() else node.module
                    )
            elif isinstance(node, ast.Import):
                found[module] |= {a.name for a in node.names if a.name.startswith("pipeline")}
    return found


def test_every_import_between_wings_points_one_way_and_shared_modules_import_no_wing():
    upward = []
    for module, targets in _imports().items():
        for target in targets:
            source, wing = _wing(module), _wing(target)
            if wing in ("shared", source) or target == "pipeline":
                continue
            if source == "shared" or WINGS.index(wing) > WINGS.index(source):
                upward.append(f"{module} → {target}")
    assert not upward, upward


def test_folders_name_the_wings_each_says_what_it_does_and_no_two_modules_differ_by_a_suffix():
    folders = sorted(p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert [p.name for p in folders] == sorted(WINGS)
    for folder in [PACKAGE, *folders]:
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 10, folder
        names = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
        for a in names:
            for b in names:
                assert a == b or not b.startswith(a), f"{folder.name}/: {a} and {b} differ only by a suffix"


def test_no_function_of_the_library_or_the_jobs_takes_more_than_eight_parameters():
    """Options that travel together are one dataclass (PrepareOptions, InferenceOptions, Recipe...)."""
    wide = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "jobs").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if p]
                if len([n for n in names if n not in ("self", "cls")]) > 8:
                    wide.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert not wide, wide


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_every_jobs_help_answers_without_ray_torch_or_mlflow(job):
    """As on a machine where those are not installed: importing any of them fails."""
    script = (
        "import runpy, sys\n"
        "for name in ('ray', 'torch', 'torchvision', 'mlflow'):\n"
        "    sys.modules[name] = None  # import fails, as if absent\n"
        f"sys.argv = [{str(ROOT / 'jobs' / job)!r}, '--help']\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
