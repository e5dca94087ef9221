"""pinfer client: a small SDK (``client.sdk``) and the bulk ``pinfer ingest`` tool (``client.ingest``).

Only ``requests`` (and ``tqdm`` for ingest) are needed, so it installs on a laptop without torch.
``client.ingest`` is not imported here, so ``python -m client.ingest`` runs it cleanly.
"""
from client.sdk import (
    JOB_DONE_STATUSES,
    TERMINAL_STATUSES,
    AddResult,
    ApiError,
    ApiUnreachable,
    Client,
    ClientError,
    Overloaded,
    ResultsPage,
    WaitTimeout,
)

__all__ = [
    "AddResult",
    "ApiError",
    "ApiUnreachable",
    "Client",
    "ClientError",
    "JOB_DONE_STATUSES",
    "Overloaded",
    "ResultsPage",
    "TERMINAL_STATUSES",
    "WaitTimeout",
]
