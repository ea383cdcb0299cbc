"""What the service's front ends (SMTP listener, HTTP API, pickup watcher, admin API) need of it.

A structural type, not the :class:`~fastmta.serve.service.Service` class
itself: each front end is written and tested against this, and the service
module (which builds them all) is the only one that imports them, so the
imports inside ``fastmta.serve`` flow one way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from fastmta.errors import FastMTAError

if TYPE_CHECKING:
    from fastmta.delivery.engine import Engine

__all__ = ["INJECTION_PATHS", "ServiceAPI", "Unavailable"]

#: How mail got in: the ``via`` of :meth:`ServiceAPI.inject`, a metrics label and accounting meta.
INJECTION_PATHS = ("smtp", "http", "pickup", "api")


class Unavailable(FastMTAError):
    """The service cannot take mail now (journal not writable, engine stopped, shutting down).

    SMTP answers 421/451 and the HTTP API 503: the client keeps the message
    and retries; nothing that cannot be stored is accepted.
    """


class ServiceAPI(Protocol):
    """The running service, as its front ends see it."""

    @property
    def engine(self) -> Engine: ...

    async def inject(
        self, content: bytes, sender: str, recipients: list[str], *, via: str, meta: dict[str, Any] | None = None
    ) -> str:
        """Accept a message durably and return its id.

        Returns only once the message is in the journal (group commit): a
        crash after that loses nothing. Raises
        :class:`~fastmta.errors.InputError` for a malformed message or
        address (naming it; nothing accepted) and :class:`Unavailable` when
        nothing can be stored now.
        """
        ...

    def campaign_message(self, campaign: str, recipient: str, sender: str, message: bytes) -> tuple[str, bytes]:
        """(envelope sender, message) of one rendered campaign message, as campaigns from the pickup directory
        get them: the signed return path and trace header ([return_path]), Feedback-ID, and the one-click
        List-Unsubscribe headers ([unsubscribe]) where the template has none."""
        ...

    def refused(self, via: str, reason: str) -> None:
        """Count one message a front end refused before :meth:`inject` (``fastmta_rejected_messages_total``):
        *reason* is one of a few fixed words (invalid, too_big, no_memory, unavailable, error)."""
        ...

    def ready(self) -> tuple[bool, str]:
        """(ready, why not): the journal is writable and the engine running."""
        ...

    def http_principal(self, token: str) -> str | None:
        """The name of the API client whose bearer token this is, else None."""
        ...

    def admin_principal(self, token: str) -> str | None:
        """The name of the operator whose admin token this is, else None."""
        ...

    def render_metrics(self) -> tuple[bytes, str]:
        """The Prometheus exposition and its content type."""
        ...
