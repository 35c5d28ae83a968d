"""The README's result numbers are generated from the records (figures/readme_numbers.py), never typed: every block
the README places must be what the script makes from the committed records."""
from pathlib import Path

from figures import readme_numbers

REPO = Path(__file__).resolve().parents[1]


def test_readme_number_blocks_match_the_records():
    text = (REPO / "README.md").read_text()
    placed = [b for b, _, _ in readme_numbers.blocks_in(text)]
    assert placed, "the README places no generated number blocks"
    new, changed = readme_numbers.fill(text)
    assert not changed, f"stale README blocks (run python figures/readme_numbers.py): {changed}"


def test_readme_opens_with_the_quick_start():
    heads = [ln for ln in (REPO / "README.md").read_text().splitlines() if ln.startswith("## ")]
    assert heads[0].startswith("## Quick start")
