"""The README's library example runs against the current API and gives the shape it states."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    section = README.read_text().split("## As a library", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_library_example_runs_and_gives_the_shape_it_states():
    code = _example()
    stated = re.search(r"images = .*?#\s*\[([\d, ]+)\]", code, re.S)
    assert stated, "the example no longer states the shape of `images`"
    # The same calls at a test's size: a smaller network, two sampler steps.
    small = code.replace("dim=64", "dim=8").replace("steps=50", "steps=2")
    assert small.count("dim=8") == 1 and small.count("steps=2") == 1, "the example changed: update this test"
    namespace: dict = {}
    exec(compile(small, str(README), "exec"), namespace)
    assert namespace["images"].shape == tuple(int(n) for n in stated.group(1).split(","))
    assert np.isfinite(np.asarray(namespace["images"])).all()
    assert namespace["loss"].shape == () and float(namespace["loss"]) > 0
