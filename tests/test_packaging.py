"""Layout promises: the import contracts hold and bite, test folders shadow nothing, the wheel ships every package."""

import configparser
import os
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


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run import-linter on the tree at ``root`` (its packages first on the path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "backends")])}
    return subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )


def test_the_import_contracts_hold():
    """`.importlinter` is the layering: spec, core, backends, hosts (see its header)."""
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    "path, line, contract",
    [
        ("backends/psft_torch/loss.py", "import psft_mlx.loss", "The backends never import each other"),
        ("backends/psft_mlx/loss.py", "import psft_plugin.integrations.axolotl.args", "Backends import no host code"),
        ("psft_plugin/registry.py", "import psft_torch", "The core imports neither backend nor any host"),
        ("psft_plugin/spec/reference.py", "import torch", "The spec imports no framework"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path, path, line, contract):
    for name in (".importlinter", "psft_plugin", "backends"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, tmp_path / name)
    target = tmp_path / path
    target.write_text(target.read_text() + f"\n{line}  # injected by the test\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0 and f"{contract}" in result.stdout and "BROKEN" in result.stdout, result.stdout


def test_every_core_module_is_named_in_the_core_contract():
    """A new module under psft_plugin/ is either core (listed in the contract) or a host/tool package."""
    contracts = configparser.ConfigParser()
    contracts.read(ROOT / ".importlinter")
    core = contracts["importlinter:contract:core-imports-no-backend-or-host"]
    listed, outside = (set(core[key].split()) for key in ("source_modules", "forbidden_modules"))
    modules = {
        f"psft_plugin.{path.stem if path.suffix else path.name}"
        for path in (ROOT / "psft_plugin").iterdir()
        if path.suffix == ".py" and path.stem != "__init__" or (path / "__init__.py").exists()
    }
    assert modules and modules <= listed | outside, modules - listed - outside


def test_no_test_folder_shadows_an_importable_package():
    """pytest puts `tests/` on sys.path, so a folder there named like a package (a `tests/mlx`)
    becomes a namespace portion of it: transformers then saw an `mlx` that has no `mlx.core`."""
    import importlib.metadata

    top_level = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    folders = {
        path.name for path in (ROOT / "tests").iterdir() if path.is_dir() and not path.name.startswith((".", "_"))
    }
    assert folders and not folders & top_level, folders & top_level


def test_wheel_ships_the_three_packages_and_the_vectors(tmp_path):
    # Build from a copy of the tracked files: an in-tree build/ left by earlier builds could
    # supply files the package list no longer names.
    source = tmp_path / "src"
    for name in subprocess.run(
        ["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("psft_plugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "psft_plugin/spec/vectors/psft_loss.json",
        "psft_plugin/spec/vectors/token_logprobs.json",
        "psft_plugin/spec/vectors/dft_loss.json",
        "psft_torch/loss.py",
        "psft_mlx/loss.py",
        "psft_plugin/registry.py",
        "psft_plugin/config.py",
        "psft_plugin/mlx_train/__main__.py",
        "psft_plugin/mlx_train/run.py",
    ):
        assert expected in names
    packages = {path.parent for path in (ROOT / "psft_plugin").rglob("__init__.py")}
    packages |= {path.parent for path in (ROOT / "backends").rglob("__init__.py")}
    for package in packages:  # the package list in pyproject is written out: nothing may be left out of it
        relative = package.relative_to(ROOT / "backends" if "backends" in package.parts else ROOT)
        assert f"{relative.as_posix()}/__init__.py" in names, relative
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[psft_plugin.objectives]" in entry_points and "psft = psft_plugin.objectives:psft" in entry_points
    assert "dft = psft_plugin.objectives:dft" in entry_points
    # Axolotl 0.21 loads training plugins from this group (so `loss: psft` needs no `plugins:` line)
    assert "[axolotl.plugins]\npsft = psft_plugin.integrations.axolotl:PSFTPlugin" in entry_points
