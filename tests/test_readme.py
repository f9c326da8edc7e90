"""The README's Python examples run as written (from a folder holding a copy of configs/)."""

import os
import re
import shutil

import pytest

from conftest import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    shutil.copytree(os.path.join(ROOT, "configs"), tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})
    out = capsys.readouterr().out
    accuracy = [float(x) for x in re.findall(r"(?:accuracy[\"']?:? )(0\.\d+)", out)]
    assert accuracy and accuracy[-1] > 0.9, out  # the final figure printed
