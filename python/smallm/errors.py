"""The base of every error smallm raises for the user to act on.

Each stage has its own error class (:class:`~smallm.data.shardset.ShardError`,
:class:`~smallm.run.checkpoint.CheckpointError`, ...), and each is a :class:`SmallmError` too, so a console
script turns all of them into one line and an exit code in one place (:mod:`smallm.cli.common`). The
message names the file, line, field or setting at fault and says what to do; it is never a traceback.
"""

from __future__ import annotations

__all__ = ["SmallmError", "listing"]


class SmallmError(Exception):
    """A failure caused by the input or the environment (a bad file, a wrong setting, a full disk),
    described for the user rather than for a debugger."""


def listing(names: list[str], limit: int = 8) -> str:
    """The first ``limit`` of ``names`` joined for a message, and how many more there are."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
