"""Module boundaries are checked by a tool, not by goodwill."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contracts_hold():
    from importlinter.cli import lint_imports

    exit_code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert exit_code == 0, "import-linter contracts broken (run `lint-imports` for details)"


def test_scheduler_runs_without_torch_loaded():
    code = (
        "import sys, molink.scheduler, molink.messages, molink.sampling_params, molink.config\n"
        "from molink import SamplingParams\n"
        "banned = [m for m in ('torch', 'numpy', 'transformers') if m in sys.modules]\n"
        "print(','.join(banned))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    assert result.stdout.strip() == ""
