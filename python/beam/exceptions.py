"""Exceptions raised by the SDK and the client."""
from __future__ import annotations


class BeamError(Exception):
    """Base class of every error this package raises."""


class TimeoutError(BeamError):  # noqa: A001 - mirrors the remote error type's role
    """A request ran past the endpoint's ``timeout`` (raised inside the handler)."""


class TaskTimeout(BaseException):
    """Raised *inside* a handler (or a hook) that ran past its time limit.

    A ``BaseException``, like ``KeyboardInterrupt``: an ``except Exception:`` in the
    handler must not swallow the timeout and keep running."""


class RemoteError(BeamError):
    """The worker answered a request with an error.

    ``type`` is the remote exception class name (``"ValueError"``) or one of the worker's
    own (``"Timeout"``, ``"BadRequest"``, …, see docs/protocol.md); ``remote_traceback``
    is the handler's formatted traceback when there is one.
    """

    def __init__(self, type: str, message: str, remote_traceback: str = "",
                 task_id: str = "") -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.remote_traceback = remote_traceback
        self.task_id = task_id


class ConnectionClosed(BeamError):
    """The worker closed the connection before answering every request sent on it.

    ``unanswered``: the request ids sent on the connection that got no answer (they may
    or may not have run); ``responses``: the answers that did arrive, in order."""

    unanswered: list = []
    responses: list = []
