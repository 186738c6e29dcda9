"""README.md stays true: its test command is what CI runs, its op table is the registry's."""

from __future__ import annotations

import re
from pathlib import Path

from fx_bk.rules import supported_ops_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_op_table_matches_rule_registry():
    table = re.search(r"<!-- optable:start -->\n(.*?)\n<!-- optable:end -->", README, re.S)
    assert table is not None
    assert table.group(1) == supported_ops_table()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    for part in test_cmd.split(" && "):
        assert part.replace("pip install", "").strip() in ci, part
    assert "python -m fx_bk.demo" in " ".join(blocks)


def test_architecture_table_matches_the_zoo():
    from .zoo import table as zoo_table

    table = re.search(r"<!-- zootable:start -->\n(.*?)\n<!-- zootable:end -->", README, re.S)
    assert table is not None
    assert table.group(1) == zoo_table()
