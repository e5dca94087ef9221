"""pinfer client: a small SDK (``pinfer_client.sdk``) and the bulk ingest tool (``pinfer_client.ingest``,
the ``pinfer-ingest`` command; ``pinfer ingest`` on a server install).

Its own distribution (``pip install ./client``): only ``requests`` (and ``tqdm`` for ingest) are
needed, so it installs on a laptop without torch or the server packages. ``pinfer_client.ingest`` is
not imported here, so the SDK alone does not import tqdm.
"""
from pinfer_client.sdk import *  # noqa: F401,F403  (the public names: sdk.__all__, listed once)
from pinfer_client.sdk import __all__  # noqa: F401
