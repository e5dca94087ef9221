"""pinfer client: a small SDK (``pinfer_client.sdk``) and the bulk ingest tool (``pinfer_client.ingest``,
the ``pinfer-ingest`` command; ``pinfer ingest`` on a server install).

Its own distribution (``pip install ./client``): only ``requests`` (and ``tqdm`` for ingest) are
needed, so it installs on a laptop without torch or the server packages. ``pinfer_client.ingest`` is
not imported here, so the SDK alone does not import tqdm.
"""
from pinfer_client.sdk import (
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
from pinfer_client.stop import Stopped, StopToken

__all__ = [
    "AddResult",
    "ApiError",
    "ApiUnreachable",
    "Client",
    "ClientError",
    "JOB_DONE_STATUSES",
    "Overloaded",
    "ResultsPage",
    "StopToken",
    "Stopped",
    "TERMINAL_STATUSES",
    "WaitTimeout",
]
