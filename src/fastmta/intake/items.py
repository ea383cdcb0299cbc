"""What the spool reader yields: work items, rejects, and the input boundaries.

A leaf module, so that the readers of each input kind (``pickup``, ``campaign``)
and the directory reader that combines them (``reader``) import it, not each other.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class SpoolItem:
    content: bytes
    sender: str
    recipients: list[str]
    source: str
    line: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # the input it belongs to
    row: int = 0  # its row in that input
    take_key: int = 0  # what identifies the row whatever its position (see ResumePoint)
    #: DKIM signing still to do (``sign_later``): *content* is unsigned, and
    #: the consumer signs it off the event loop. RSA and the body hash release
    #: the GIL, so a thread pool puts them on another core.
    sign: Callable[[bytes], bytes] | None = None

    def __reduce__(self) -> tuple[type[SpoolItem], tuple[Any, ...]]:
        # Pickled by the intake process for each message (fastmta.intake.process): as the constructor's
        # arguments, unpickling costs ~2.5 µs instead of ~4.5 (the default rebuilds a slotted, frozen
        # object attribute by attribute), in the process that is the bottleneck.
        return (SpoolItem, (self.content, self.sender, self.recipients, self.source, self.line, self.meta, self.key,
                            self.row, self.take_key, self.sign))


def record_text(text: str) -> str:
    """*text* as it can go on record (journal, accounting, rejects): a byte the OS name could not decode
    (a file name that is not UTF-8, kept by Python as a lone surrogate) written ``\\xNN``; else *text* itself.

    Records are UTF-8, and a lone surrogate cannot be encoded: a pickup file named ``b"bad-\\xff.eml"``
    once made the run fail on its first record (or its message vanish). The name on record is for
    people; the file itself is still opened by its real name.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the bytes the OS name had
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")  # a surrogate no decoding made (a JSON "\ud800")
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class Reject:
    source: str
    line: int | None
    reason: str
    key: str = ""
    row: int = 0

    def __post_init__(self) -> None:
        # Written to the rejects file and the summary: never a text that cannot be encoded there.
        object.__setattr__(self, "source", record_text(self.source))
        object.__setattr__(self, "reason", record_text(self.reason))

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.source, "line": self.line, "reason": self.reason}

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Sunset(Reject):
    """A recipient the campaign's sunset policy leaves out (inactive too long): never sent, not bad input.

    A :class:`Reject` by type, so a consumer that does not know sunsets yet reports it and never sends it;
    one that does (``fastmta send``) checks for it first and writes :meth:`as_record` (an accounting record
    with status ``sunset``) instead, without counting it as rejected input.
    """

    recipient: str = ""
    campaign: str = ""
    last_engaged: str = ""

    def as_record(self, now: float) -> dict[str, Any]:
        return {"status": "sunset", "time": round(now, 6), "recipient": self.recipient, "campaign": self.campaign,
                "job": self.campaign, "reason": self.reason, "last_engaged": self.last_engaged,
                "file": self.source, "line": self.line}


@dataclass(frozen=True, slots=True)
class InputStart:
    key: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class InputEnd:
    key: str


@dataclass(frozen=True, slots=True)
class InputSkipped:
    """An input already finished by an earlier run, or a pickup file whose content was met already."""

    key: str
    source: str = ""  # the file, where the input is one (a pickup file)
    why: str = ""  # for a pickup file: why it is not sent (its content was sent, or met in this reading)


Event = SpoolItem | Reject | InputStart | InputEnd | InputSkipped
@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where to take an input up again.

    *row*: rows before it were taken by an earlier run of the same content
    (a shortcut: they are not even parsed). *taken*: keys of rows taken by
    any earlier run, whatever the content then (an edited CSV, a renamed
    or touched file): those rows are skipped wherever they now are.
    """

    row: int = 0
    taken: Container[int] = frozenset()


#: (input key, content fingerprint) -> where to resume, or None when the input is finished.
Resume = Callable[[str, str], "ResumePoint | None"]


