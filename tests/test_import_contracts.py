"""Module boundaries are checked by a tool, not by goodwill."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contracts_hold():
    import logging

    from importlinter.cli import lint_imports

    # import-linter configures logging and so disables every logger that exists already;
    # give them back, or later tests in this process lose the log lines they check
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    disabled = {id(logger): logger.disabled for logger in loggers}
    try:
        exit_code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    finally:
        for logger in loggers:
            logger.disabled = disabled[id(logger)]
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
