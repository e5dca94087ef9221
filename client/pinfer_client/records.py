"""Plain records and names the API hands back for bulk calls, shared by the SDK and ``ingest``."""
from __future__ import annotations

from dataclasses import dataclass, field

#: Prediction statuses after which nothing changes any more.
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
#: Job statuses after which no new result appears (once the cursor has caught up).
JOB_DONE_STATUSES = frozenset({"finished", "canceled"})


# --- results of bulk calls -------------------------------------------------------------------------
@dataclass
class AddResult:
    """What one :meth:`Client.add_images` call got into the job: every name is in exactly one of
    ``accepted``/``duplicates``/``rejected`` (in the job) or ``pending`` (must be sent again)."""

    accepted: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    overloaded: bool = False
    retry_after: float | None = None

    @property
    def names_in(self) -> set[str]:
        """Names the job now holds (each will have a result line)."""
        return {d["name"] for d in (*self.accepted, *self.duplicates, *self.rejected)}


@dataclass
class ResultsPage:
    """One ``/results`` answer; ``done`` means the cursor has caught up with a finished job."""

    results: list[dict]
    next_cursor: int
    job_status: str
    done: bool


def wire_name(name: str) -> str:
    """A job image name that survives multipart encoding unchanged.

    requests/urllib3 send ``"``, CR and LF in a filename as ``%22``/``%0D``/``%0A``, and the
    server's parser (werkzeug) turns ``\\x`` into ``x`` and ``%22`` into ``"``: such a name would
    come back from the server as another name. Names without ``\\``, CR, LF or ``%22`` are
    returned as they are; the others get ``%``, ``\\``, CR and LF percent-encoded."""
    if not any(c in name for c in "\\\r\n") and "%22" not in name:
        return name
    return (name.replace("%", "%25").replace("\\", "%5C").replace("\r", "%0D").replace("\n", "%0A"))
