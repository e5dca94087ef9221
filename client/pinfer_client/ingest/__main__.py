"""``python -m pinfer_client.ingest``: the same command as ``pinfer-ingest``."""
import sys

from pinfer_client.ingest.cli import main

sys.exit(main(prog="python -m pinfer_client.ingest"))
