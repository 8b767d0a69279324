"""The README's Python examples run as written: each ```python block is, verbatim, a marked
region of examples/readme_examples.py, which runs on tiny data it writes itself."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from helpers import run_example

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "readme_examples.py"


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [textwrap.dedent(b).strip() for b in re.findall(r"```python\n(.*?)```", text, re.S)]


def example_regions() -> dict[str, str]:
    text = EXAMPLE.read_text()
    found = re.findall(r"^[ \t]*# README: (\S+)\n(.*?)^[ \t]*# /README$", text, re.S | re.M)
    return {name: textwrap.dedent(body).strip() for name, body in found}


def test_every_readme_python_block_is_a_region_of_the_example():
    blocks, regions = readme_blocks(), example_regions()
    assert len(blocks) >= 3, "the README lost its Python examples"
    unmatched = [b for b in blocks if b not in regions.values()]
    assert not unmatched, (
        "README Python blocks not mirrored verbatim in examples/readme_examples.py "
        "(between '# README: NAME' and '# /README'):\n\n" + "\n\n---\n\n".join(unmatched)
    )


@pytest.mark.slow
def test_the_readme_examples_run():
    out = run_example("readme_examples.py")
    assert "ok: every README example ran" in out


def readme_prose_words() -> int:
    """Words of the README outside code blocks (what a reader reads as text)."""
    text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.S)
    return len(re.findall(r"[A-Za-z0-9][\w'’.-]*", text))


def test_the_readme_is_a_user_document_not_a_notebook():
    words = readme_prose_words()
    assert words <= 1800, f"README.md has {words} words of prose outside code blocks (<= 1,800)"
    text = (ROOT / "README.md").read_text()
    # it opens with the two commands, each saying what it does
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]
    assert all("#" in line for line in first_block)
    # every docs/ page it links to exists
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).exists(), link
