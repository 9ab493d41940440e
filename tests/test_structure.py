"""Package structure: no import cycles (module-level or lazy), no backend branches outside parallel/,
a config layer that imports no torch, and shipped files that a wheel carries."""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mats_scale"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def import_graph() -> dict[str, set[str]]:
    """Module -> the mats_scale modules it imports anywhere (inside functions and TYPE_CHECKING too)."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        name = _module_name(path)
        tree = ast.parse(path.read_text())
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("mats_scale"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mats_scale"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if _is_module(sub) else node.module)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "mats_scale.train.loop" in graph and graph["mats_scale.train.loop"]
    assert find_cycle(graph) == []


def test_models_and_masking_do_not_import_the_job_config_or_parallel():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith(("mats_scale.models", "mats_scale.masking")):
            bad = {d for d in deps if d == "mats_scale.config" or d.startswith("mats_scale.parallel")}
            assert not bad, f"{name} imports {bad}"


def test_no_backend_branch_outside_parallel():
    """Only mats_scale/parallel (and the config's own validation) may compare parallel.backend."""
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "parallel" or rel.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and "parallel.backend" in ast.unparse(node):
                offenders.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def test_config_layer_imports_no_torch():
    code = (
        "import sys, mats_scale.config, mats_scale.tokens, mats_scale.models.args; "
        "sys.exit(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=PKG.parent).returncode == 0


# ---- commands and scripts -------------------------------------------------------------------------

ROOT = PKG.parent
COMMANDS = (
    "pretrain",
    "finetune",
    "ablate",
    "study",
    "plan",
    "plan_finetune",
    "flops",
    "memory",
    "prepare",
    "synth",
    "export",
    "visualize",
    "gpucheck",
)
SHIMS = {
    "launchers": ("ablate.py", "finetune.py", "pretrain.py", "study.py"),
    "profiling": ("feasibility.py", "flops_per_mask_ratio.py", "memory_per_mask_ratio.py"),
}
SCRIPT_FOLDERS = ("launchers", "profiling", "benchmarks")


def test_every_command_is_a_console_script_and_a_launch_module():
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {f"mats-{c.replace('_', '-')}": f"mats_scale.launch.{c}:main" for c in COMMANDS}
    for command in COMMANDS:
        tree = ast.parse((PKG / "launch" / f"{command}.py").read_text())
        assert "main" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, command
        runs = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert runs, f"python -m mats_scale.launch.{command} runs nothing"


def test_launchers_and_profiling_scripts_are_thin_shims():
    """A shim imports its command's main and runs it: no code of its own to test or to import."""
    for folder, names in SHIMS.items():
        scripts = sorted((ROOT / folder).glob("*.py"))
        assert tuple(p.name for p in scripts) == names
        for path in scripts:
            tree = ast.parse(path.read_text())
            assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))], path
            ours = [
                n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module.startswith("mats")
            ]
            assert len(ours) == 1 and ours[0].startswith("mats_scale.launch."), (path, ours)


def test_tests_import_no_script():
    """Tests call ``mats_scale.launch.X.main``; the scripts of launchers/, profiling/ and benchmarks/ are
    only ever run."""
    offenders = []
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module"):
                names = [ast.unparse(node.args[0]).strip("'\"f")] if node.args else []
            offenders += [
                f"{path.name}:{node.lineno}: {n}" for n in names if n.split(".")[0] in SCRIPT_FOLDERS
            ]
    assert offenders == []


def test_command_help_imports_no_torch():
    """``--help`` answers at once: torch (seconds to import) only after the command line is valid."""
    light = [c for c in COMMANDS if c != "visualize"]
    code = (
        "import contextlib, importlib, io, sys\n"
        f"for command in {light!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        importlib.import_module(f'mats_scale.launch.{command}').main(['--help'])\n"
        "    if 'torch' in sys.modules:\n"
        "        sys.exit(f'--help of {command} imported torch')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_names_itself_and_answers_a_wrong_argument_in_one_line(command, monkeypatch, capsys):
    """Every command's usage names it as it was started, and a wrong argument is one ``error:`` line
    (not argparse's usage block) with exit status 2."""
    main = importlib.import_module(f"mats_scale.launch.{command}").main
    monkeypatch.setattr(sys, "argv", ["-c"])  # as `python -c` / `python -m` start it
    with contextlib.suppress(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith(f"usage: python -m mats_scale.launch.{command} "), usage
    try:
        rc = main(["--no-such-flag"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "error: " in err[0], (rc, err)
    assert "--no-such-flag" in err[0] or "required" in err[0], err


def test_no_module_over_500_lines():
    long = {
        str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500
    }
    assert long == {}
