"""Layout promises: backends never import each other's framework; vectors ship in the wheel."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize(
    "module, forbidden",
    [("psft_torch", "mlx"), ("psft_mlx", "torch"), ("psft_plugin.registry", "torch"), ("psft_plugin.registry", "mlx")],
)
def test_importing_a_backend_does_not_import_the_other_framework(module, forbidden):
    _run(f"import sys, {module}\nassert {forbidden!r} not in sys.modules, sorted(sys.modules)")


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package, forbidden", [("psft_torch", {"mlx", "mlx_lm", "psft_mlx"}),
                                                ("psft_mlx", {"torch", "transformers", "psft_torch"})])
def test_no_backend_source_file_imports_the_other(package, forbidden):
    files = list((ROOT / "backends" / package).rglob("*.py"))
    assert files
    for path in files:
        assert not (_imported_roots(path) & forbidden), path


def test_core_imports_only_numpy_and_pluggy():
    allowed = {"numpy", "pluggy", "psft_plugin", "__future__"}
    stdlib = set(sys.stdlib_module_names)
    core = ["__init__", "hookspecs", "objective", "objectives", "options", "registry"]
    for path in [*(ROOT / "psft_plugin" / f"{name}.py" for name in core), *(ROOT / "psft_plugin" / "spec").glob("*.py")]:
        third_party = _imported_roots(path) - stdlib - allowed
        assert not third_party, (path, third_party)


def test_wheel_ships_the_three_packages_and_the_vectors(tmp_path):
    # Build from a copy of the tracked files: an in-tree build/ left by earlier builds could
    # supply files the package list no longer names.
    source = tmp_path / "src"
    for name in subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(source)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("psft_plugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("psft_plugin/spec/vectors/psft_loss.json", "psft_plugin/spec/vectors/token_logprobs.json",
                     "psft_torch/loss.py", "psft_mlx/loss.py", "psft_plugin/registry.py"):
        assert expected in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[psft_plugin.objectives]" in entry_points and "psft = psft_plugin.objectives:psft" in entry_points
