"""Runs every ``python`` block of docs/guide.md in order, in one namespace, on a real local Ray runtime."""

import pathlib
import re

GUIDE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "guide.md"


def test_guide_examples_run(ray_local):
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) >= 8, "the guide has one example per capability"
    ns: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{GUIDE.name}[block {i}]", "exec"), ns)
        except Exception as exc:
            raise AssertionError(f"docs/guide.md block {i} failed: {exc!r}\n{code}") from exc
