"""Who is acting: identity resolution for command-line actions.

The name resolved here is a *claim*; governance authenticates it where an action needs a
responsible person (``compliance.users``).
"""
from __future__ import annotations

import os


def acting_user(explicit: str | None = None) -> str:
    """The user an action is attributed to: ``--as``, else ``CXR_USER``, else the OS user."""
    if explicit:
        return explicit
    if os.environ.get("CXR_USER"):
        return os.environ["CXR_USER"]
    import getpass

    return getpass.getuser()
