"""User-facing errors.

Anything the user can fix (bad input file, mismatched features, missing column) raises
`QProbeError` with one line saying what is wrong and where. The CLI prints that line and exits
with code 2; library users catch it like any exception. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


class QProbeError(Exception):
    """A problem with the user's input, reported as one clear line (CLI exit code 2)."""


class FeatureSpecMismatch(QProbeError):
    """Features of one model/layer/position/dim were given to something built for another."""
