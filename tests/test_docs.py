"""The README and docs/ name functions a reader is sent to: every `meml.<module>.<name>` they
name must exist (a rename that leaves the front page pointing nowhere fails here), and the
README stays a front page."""
import importlib
import re

import pytest

from conftest import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
NAME = re.compile(r"`(meml(?:\.\w+)+)")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for split in range(len(parts), 1, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_function_a_page_names_exists(page):
    names = sorted(set(NAME.findall(page.read_text())))
    assert names or page.name != "README.md"
    missing = [n for n in names if not _resolves(n)]
    assert not missing, f"{page.name} names {missing}"


def test_the_readme_is_a_front_page_that_links_its_pages():
    text = (REPO_ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in text, page.name
    for d in range(1, 28):  # one line per decision, the details in docs/decisions.md
        assert re.search(rf"^- D{d} ", text, re.M), f"D{d}"
