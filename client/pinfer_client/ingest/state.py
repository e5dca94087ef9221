"""The state file beside ``--out`` (``<out>.state.json``): which job this output belongs to and how far
its results cursor has been read, so a rerun continues the same job."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

STATE_VERSION = 1


def state_path_for(out: Path) -> Path:
    """``<out>.state.json``, beside the results."""
    return out.with_name(out.name + ".state.json")


def load_state(path: Path) -> dict | None:
    """The saved state, or None when absent or unreadable (then a new job is made)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or not state.get("job_id"):
        return None
    return state


def save_state(path: Path, state: dict) -> None:
    """Write atomically (temp file + rename): a crash leaves the old state or the new, never half."""
    state = dict(state, version=STATE_VERSION, updated_at=time.time())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
