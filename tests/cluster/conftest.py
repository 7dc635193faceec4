"""Fixtures of the cluster tests (helpers live in cluster_support.py)."""
from cluster_support import kiln_pb2, references  # noqa: F401  (pytest fixtures)
