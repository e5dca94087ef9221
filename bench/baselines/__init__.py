"""The designs pinfer is measured against (see flask_sync.py)."""
