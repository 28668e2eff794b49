"""Fake stage 3: needs the exported model directory, writes a results record."""

import sys
from pathlib import Path

from pipeline._fake import fail_if_asked, flag, record

if not Path(flag("--model")).is_dir():
    sys.exit(f"fake evaluate: no model at {flag('--model')}")
fail_if_asked("evaluate")
record(Path(flag("--out")) / "results.json")
