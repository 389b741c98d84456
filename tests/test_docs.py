"""The README and the docs as a newcomer uses them: the examples run as written, the two set-up
commands are there, and CI runs exactly the README's test command."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from rms_helpers import clean_env, run_python

ROOT = Path(__file__).resolve().parent.parent
SETUP_MAIN_JOB = 'python -m pip install -e ".[bench]" && python -m fastrms bench'
SETUP_TESTS = 'python -m pip install -e ".[test]" && pytest'


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


EXAMPLES = [(name, k, code) for name in ("README.md", "docs/contract.md")
            for k, code in enumerate(_python_blocks(ROOT / name))]


@pytest.mark.parametrize("name, index, code", EXAMPLES, ids=[f"{n}#{k}" for n, k, _ in EXAMPLES])
def test_the_examples_run_as_written(name, index, code, tmp_path):
    expected = re.findall(r"print\(.*\)\s+# (.*)", code)
    proc = run_python(code, env=clean_env(PYTHONPATH=str(ROOT)), args=())
    for line in expected:
        assert line.strip() in proc.stdout, (name, index, proc.stdout)


def test_the_readme_has_two_examples_and_the_two_set_up_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(_python_blocks(ROOT / "README.md")) == 2
    for command in (SETUP_MAIN_JOB, SETUP_TESTS):
        assert f"```bash\n{command}\n```" in readme


def test_ci_runs_exactly_the_readme_test_command():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert SETUP_TESTS in [line.strip() for line in lines]


def test_docs_name_no_spec_outside_the_repository():
    """The contract is docs/contract.md; nothing in the docs or the README points elsewhere."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "SPEC.md" not in path.read_text(), path.name
