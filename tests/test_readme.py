"""The README's configuration table is the one generated from the option declarations."""

from pathlib import Path

from psft_plugin.objectives import PSFT_OPTIONS
from psft_plugin.options import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_options_table_matches_the_declarations():
    text = README.read_text()
    table = text.split("<!-- options-table -->\n", 1)[1].split("\n<!-- /options-table -->", 1)[0]
    assert table == markdown_table(PSFT_OPTIONS), "paste markdown_table(PSFT_OPTIONS) into the README"
