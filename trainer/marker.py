"""The completion marker of a run directory (read without importing torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Written into the run directory once the final model is exported.
MARKER = "COMPLETE"


def finished(run_dir: Path) -> dict[str, Any] | None:
    """The completion marker of ``run_dir``, or None when the run has not finished."""
    try:
        return json.loads((run_dir / MARKER).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"reason": "unknown (unreadable marker)"}
