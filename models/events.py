"""How the model library reports lifecycle events without knowing the audit trail.

A training or evaluation run hands each event to an ``EventSink``; the caller decides where it goes
(``pipelines.lifecycle`` writes it to the audit trail with the acting user and role). The library's
default sink drops events, so a bare library call records nothing.
"""
from __future__ import annotations

from collections.abc import Callable

EventSink = Callable[[str, str, dict], None]
"""``on_event(action, subject, details)``; ``details`` never holds PHI (ids, counts, versions, hashes)."""


def no_event(action: str, subject: str, details: dict) -> None:
    """The default sink: records nothing."""
