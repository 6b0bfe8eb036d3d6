"""Cancelling a pipeline call from another thread: ``CancelToken`` and the ``Cancelled`` it raises.

A call given ``cancel=token`` looks at ``token.cancelled`` before the text encoder runs, at the
top of every denoise step and before the VAE decoder; once it is set the call raises
``Cancelled`` there and runs nothing further. Any object with a ``cancelled`` bool attribute
works as a token (a server's per-request state, say).
"""
from __future__ import annotations

import threading
from typing import Any


class Cancelled(Exception):
    """A pipeline call stopped because its cancel token was set; the message says where."""


class CancelToken:
    """A flag one thread sets (``cancel()``) and a running call reads (``cancelled``); safe to share."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the call holding this token to stop at its next check; later calls with it stop at once."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def __repr__(self) -> str:
        return f"CancelToken(cancelled={self.cancelled})"


def is_token(cancel: Any) -> bool:
    """Whether ``cancel`` can serve as a call's ``cancel=``: None, or an object with a ``cancelled`` bool."""
    return cancel is None or isinstance(getattr(cancel, "cancelled", None), bool)


def raise_if_cancelled(cancel: Any, where: str) -> None:
    """Raise ``Cancelled("cancelled before <where>")`` when ``cancel`` (None: never) is set."""
    if cancel is not None and cancel.cancelled:
        raise Cancelled(f"cancelled before {where}")
