"""Exceptions raised by the index core.

    JointPQError                 base of everything this project raises on purpose
    ├── ArtifactError            an artifact is missing, corrupt, or inconsistent (names the file)
    └── SearchError              a search request the index cannot answer
        └── DimensionMismatch    query width differs from the index dimension

Every message names what was expected and what was found, so an operator can act on it
without reading code (``codes: sha256 mismatch``, ``queries have 7 dims, index expects 384``).
"""

from __future__ import annotations


class JointPQError(Exception):
    """Base class for errors raised deliberately by jointpq."""


class ArtifactError(JointPQError):
    """The artifact on disk cannot be trusted; the message names the file and the problem."""


class SearchError(JointPQError, ValueError):
    """A search call with arguments the index cannot serve (bad k, nprobe, dtype, NaN...)."""


class DimensionMismatch(SearchError):  # noqa: N818 - the name users grep for
    """Query vectors are not as wide as the index."""
