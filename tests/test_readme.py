"""The README's Python examples run as written (those marked 'Executed by tests/test_readme.py')."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
MARK = "# Executed by tests/test_readme.py."


def _blocks():
  with open(README) as f:
    text = f.read()
  return [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if b.startswith(MARK)]


def test_readme_has_executed_examples():
  assert len(_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_example_runs(index):
  exec(compile(_blocks()[index], f"README.md example {index}", "exec"), {})  # pylint: disable=exec-used
