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
