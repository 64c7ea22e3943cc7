"""The README's generated tables are current, its Layout names every folder, and the docs cited exist."""

import re
import subprocess
from pathlib import Path

from psft_plugin.objectives import PSFT_OPTIONS, TRAINER_OPTIONS
from psft_plugin.options import markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONTRIBUTING = ROOT / "CONTRIBUTING.md"


def test_readme_options_table_matches_the_declarations():
    text = README.read_text()
    table = text.split("<!-- options-table -->\n", 1)[1].split("\n<!-- /options-table -->", 1)[0]
    expected = markdown_table(PSFT_OPTIONS + TRAINER_OPTIONS)
    assert table == expected, "paste markdown_table(PSFT_OPTIONS + TRAINER_OPTIONS) into the README"


def test_readme_objectives_table_matches_the_declarations():
    from psft_plugin.registry import ObjectiveRegistry, make_plugin_manager, objectives_table

    text = README.read_text()
    table = text.split("<!-- objectives-table -->\n", 1)[1].split("\n<!-- /objectives-table -->", 1)[0]
    builtins = ObjectiveRegistry(make_plugin_manager(load_entry_points=False))
    assert "`dft`" in table
    assert table == objectives_table(builtins), "paste objectives_table() (built-ins only) into the README"


def _tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()


def test_contributing_layout_names_every_folder():
    layout = CONTRIBUTING.read_text().split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    folders = {str(Path(name).parent) for name in _tracked_files()} - {"."}
    missing = sorted(folder for folder in folders if f"`{folder}/" not in layout)
    assert not missing, f"add these folders to CONTRIBUTING.md's Layout: {missing}"


def test_every_cited_section_of_the_objective_document_exists():
    """Code and docs cite `docs/objective.md section N`; no file cites a document outside the repository."""
    sections = set(re.findall(r"^## (\d+)\.", (ROOT / "docs" / "objective.md").read_text(), flags=re.M))
    cited = set()
    for name in _tracked_files():
        if name.endswith((".py", ".md", ".yml", ".yaml", ".toml")):
            text = (ROOT / name).read_text()
            outside = "PSFT_" + "SPEC.md"  # the old reference document, which never shipped
            assert outside not in text, f"{name} cites {outside}, which does not ship; cite docs/objective.md"
            for numbers in re.findall(r"docs/objective\.md\s+sections?\s+([\d, and]+\d)", text):
                cited |= set(re.findall(r"\d+", numbers))
    assert cited and cited <= sections, cited - sections
