"""The README stays true: its architecture table matches the registry, and its first
lines are the two set-up commands (the second is exactly what CI runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_architecture_table_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_arch_table.py"),
                             "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_ci_runs_the_readme_test_command():
    readme_commands = [line for line in (ROOT / "README.md").read_text().splitlines()[:6]
                       if line.startswith("python3 -m venv")]
    assert len(readme_commands) == 2
    assert readme_commands[1] in (ROOT / ".ci" / "run").read_text()
