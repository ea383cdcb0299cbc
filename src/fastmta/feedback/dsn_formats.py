"""The prose bounce formats, one row per MTA family (read by :mod:`fastmta.feedback.dsn_prose`).

``ADDR`` in a pattern stands for a mail address. Patterns are matched
case-insensitively, line by line (``rcpt``, ``begin``, ``end``) or over the
report's own text (``markers``, ``delayed``, ``skip``). Rows are tried in
order; put a family whose markers overlap another's (Zoho uses Exim's opening
sentence) before it. A family is added for a FORMAT, never for one message.
"""

from __future__ import annotations

from fastmta.feedback.dsn_prose import ProseFormat

__all__ = ["FORMATS"]

# "...the following recipients:", "could not be delivered to:", "Your message to:", "addressed to email address :"
_LIST_INTRO = (
    r"(?:following|these)\s+(?:recipients?|addresses|address|users?|destinations?)(?:\(s\)|\(es\))?\b[^:]{0,60}:\s*$"
    r"|(?:delivered|sent|addressed|message) to\s*(?:email address\s*)?:\s*$"
)

FORMATS: tuple[ProseFormat, ...] = (
    ProseFormat(
        name="qmail",  # qmail, netqmail, indimail, vpopmail and the MTAs built on them (old Yahoo!, psmtpd)
        markers=(
            r"This is the qmail-send program",
            r"I'm afraid I wasn't able to deliver your message",
            r"unable to deliver (?:your )?message to the following address",
            r"Your mail message to the following address\(es\) could not be delivered",
        ),
        rcpt=(r"^\s*<(?P<a>ADDR)>:\s*(?P<d>.*)$",),
    ),
    ProseFormat(
        name="postfix",  # the prose part of a Postfix bounce whose delivery-status part is missing
        markers=(r"This is the (?:Postfix\b.{0,60}? program|mail system) at host",),
        rcpt=(r"^<(?P<a>ADDR)>(?:\s*\(expanded from <[^>]*>\))?:\s*(?P<d>.*)$",),
        delayed=r"THIS IS A WARNING ONLY|Delayed Mail \(still being retried\)",
        skip=r"Enclosed is the mail delivery report that you requested|Your message was successfully delivered",
    ),
    ProseFormat(
        name="zoho",  # opens like Exim, lists "addr Reason, ERROR_CODE :550, ERROR_CODE :5.1.1 ..."
        markers=(r"ERROR_CODE\s*:", r"\[Status: \w+, Address: <"),
        rcpt=(
            r"^\s*(?P<a>ADDR)\s+(?P<d>.*ERROR_CODE.*)$",
            r"^\s*\[Status: (?P<d>\w+, Address: <(?P<a>ADDR)>.*)\]\s*$",
        ),
        delayed=r"THIS IS A WARNING MESSAGE ONLY|will be retried",
    ),
    ProseFormat(
        name="exim",  # Exim and the services that send its text (mail.ru, GMX and 1&1, MXLogic)
        markers=(
            r"This message was created automatically by mail delivery software",
            r"A message that you (?:have )?sent (?:could not be delivered|has not yet been delivered)",
            r"не может быть доставлено",
        ),
        begin=(
            r"(?:address(?:\(es\))?\s+)?failed:\s*$|^The following address(?:\(es\))? failed"
            r"|получателям:\s*$|has not yet been delivered (?:is|are):\s*$"
        ),
        rcpt=(
            r"^ {0,2}<?\"?(?P<a>ADDR)\"?>?:?\s*$",  # "  bob@example.org", "bob@example.org:", "\"bob@example.org\":"
            r"^ {0,2}<(?P<a>ADDR)>:\s*(?P<d>\S.*)$",  # "  <bob@example.org>: 550 5.1.1 ..."
            r"^ {2}(?P<a>(?:pipe|save|file) to .*|[^\s@<>:\"]+|an undisclosed address)\s*$",  # named by local part, command, or hidden
        ),
        end=(r"^\s*No action is required on your part",),  # a delay warning's boilerplate, not a reason
        delayed=r"has not yet been delivered|Delay reason:",
    ),
    ProseFormat(
        name="sendmail",  # Sendmail 8 (and V5, X1-style "---The following addresses had delivery errors---")
        markers=(
            r"-{3,} ?The following addresses had (?:permanent fatal|transient non-fatal|delivery) errors",
            r"-{3,} ?Transcript of session follows",
        ),
        begin=r"-{3,} ?The following addresses had|-{3,} ?Transcript of session follows",
        rcpt=(
            r"^\s*<(?P<a>ADDR)>\s*(?:\(.*\))?\s*$",
            r"^\s*(?P<a>ADDR)\s*$",
            r"^(?P<d>\d{3}(?:[ -]\d\.\d{1,3}\.\d{1,3})? <(?P<a>ADDR)>\.\.\.\s.*)$",  # transcript: 550 5.1.1 <bob@...>... User unknown
            r"^(?P<a>ADDR)\s+\[(?P<d>[^\]]*)\]",  # "bob@example.org [User unknown]"
            r"^<?(?P<a>ADDR)>?\.\.\.\s+(?P<d>\S.*)$",  # transcript: <bob@...>... Deferred: 421 4.3.2 ...
        ),
        end=(  # a warning's closing lines, not a reason
            r"^\s*(?:Warning: message still undelivered|Will keep trying until|Message could not be delivered for"
            r"|Message will be deleted from queue)",
        ),
        delayed=r"transient non-fatal errors|Warning: could not send message for past|THIS IS A WARNING MESSAGE ONLY",
    ),
    ProseFormat(
        name="courier",  # Courier-MTA: "<addr>:" then the session's lines, sections ruled off with dashes
        markers=(r"running the Courier mail server",),
        begin=r"(?:the following (?:recipients|addresses)(?: only)?|further delivery notices for the following "
              r"addresses)\s*:\s*$",
        rcpt=(r"^<(?P<a>ADDR)>:\s*$",),
        end=(r"^-{20,}\s*$",),
        delayed=r"DELAYS IN DELIVERING YOUR MESSAGE|This is an\s+advisory notice",
    ),
    ProseFormat(
        name="dovecot",  # Dovecot LDA/LMTP (Sieve reject, quota): "Your message to <addr> was automatically rejected:"
        markers=(r"Your message to <[^>]+> was automatically rejected:",),
        rcpt=(r"^Your message to <(?P<a>ADDR)> was automatically rejected:\s*(?P<d>.*)$",),
    ),
    ProseFormat(
        name="gmail",  # Gmail (and the MTAs that copy its sentence)
        markers=(
            r"(?:Delivery|Delevery) to the following recipients? (?:failed|has been delayed|was aborted)",
            r"Technical details of (?:permanent|temporary) failure",
        ),
        begin=r"(?:Delivery|Delevery) to the following recipients?",
        rcpt=(r"^\s+(?:\*\s*)?(?P<a>ADDR)\s*$",),
        delayed=r"has been delayed|failed temporarily|Technical details of temporary failure",
        end=(r"^\s*-{3,} ?(?:Original message|Message truncated)",),
    ),
    ProseFormat(
        name="exchange-legacy",  # Exchange 5.5-2003 ("did not reach the following recipient(s)")
        markers=(
            r"did not reach the following recipient",
            r"The following recipient\(s\) could not be reached",
        ),
        begin=r"did not reach the following recipient|following recipient\(s\) could not be reached",
        rcpt=(
            r"^\s*(?:\"[^\"]*\"\s+|[^\s\"<>@][^\"<>@]*?\s)?<?(?P<a>ADDR)>?\s+on\s+\S.*$",  # "bob@example.org on Thu, 29 Apr 2010 ..."
            r"following recipients?(?:\(s\))?:\s*<?(?P<a>ADDR)>?\s*$",
            r"dda:SMTP=(?P<a>ADDR);",  # an X.400 form: "c=US;a= ;p=Org;o=Site;dda:SMTP=bob@example.org; on ..."
            r"^\s+<?(?P<a>ADDR)>?\s*$",
        ),
    ),
    ProseFormat(
        name="exchange",  # Exchange 2007 and later, Office 365 / Outlook.com (text or HTML)
        markers=(
            r"Delivery has failed to these recipients or groups",
            r"Delivery is delayed to these recipients or groups",
            r"Diagnostic information for administrators",
            r"Remote Server returned",
            r"Your message (?:to \S+ )?(?:couldn't|could not|wasn't) (?:be )?delivered",
        ),
        rcpt=(
            r"^\s*(?P<a>ADDR)\s*(?:<mailto:[^>]*>)?\s*$",
            r"^[^@]*\((?P<a>ADDR)\)\s*$",  # "Bob Example (bob@example.org)"
            r"^\s*<?(?P<a>ADDR)>?\s+on\s+\S.*$",
        ),
        delayed=r"Delivery is delayed to these recipients|hasn't been delivered yet|will (?:continue to )?(?:try|retry)",
        end=(r"^\s*Original message headers:",),
    ),
    ProseFormat(
        name="notes",  # Lotus Notes: the reason comes first, then the address
        markers=(r"-{5,} Failure Reasons\s*-{5,}",),
        begin=r"-{5,} Failure Reasons",
        rcpt=(r"^\s*<?(?P<a>ADDR)>?\s*$",),
        reason_first=True,
    ),
    ProseFormat(
        name="domino",  # Lotus Domino: "was not delivered to: / addr / because: / reason"
        markers=(r"was not delivered to:\s*$",),
        begin=r"was not delivered to:",
        rcpt=(r"^\s+<?(?P<a>ADDR)>?\s*$",),
    ),
    ProseFormat(
        name="opensmtpd",
        markers=(
            r"This is the MAILER-DAEMON, please DO NOT REPLY",
            r"An error has occurred while attempting to deliver a message for",
            r"A message is delayed for more than",
        ),
        rcpt=(r"^\s*<?(?P<a>ADDR)>?:\s*(?P<d>.*)$",),
        end=(r"^\s*Please note that this is only a temporary failure report",),  # a delay notice's boilerplate
        delayed=r"A message is delayed for more than|only a temporary failure report",
    ),
    ProseFormat(
        name="dragonfly",  # DragonFly Mail Agent (dma)
        markers=(r"This is the DragonFly Mail Agent",),
        rcpt=(r"There was an error delivering your mail to <(?P<a>ADDR)>",),
    ),
    ProseFormat(
        name="smail",  # smail-3 style "|--- Failed addresses follow: ---|"
        markers=(r"Failed addresses follow:",),
        begin=r"Failed addresses follow:",
        rcpt=(r"^\s*<?(?P<a>ADDR)>?\s+\.\.\.\s*(?P<d>.*)$",),
    ),
    ProseFormat(
        name="to-line",  # one-line notices: MailFoundry "Unable to deliver message to: <addr>", au/KDDI "Could not be delivered to: <addr>"
        markers=(r"Unable to deliver message to: <", r"Could not be delivered to: <"),
        rcpt=(r"(?:Unable to deliver message|Could not be delivered) to: <(?P<a>ADDR)>",),
    ),
    ProseFormat(
        name="imail",  # Ipswitch IMail / SMTP32: "Unknown user: addr", "Delivery failed 20 attempts: addr", "undeliverable to addr"
        markers=(
            r"^(?:Unknown user|Delivery failed \d+ attempts|Host unknown|Unknown host|Body of message generated response):",
            r"^undeliverable\s+to\s+\S+@",
        ),
        rcpt=(r"^(?P<d>[A-Z][A-Za-z0-9 ]+?):\s*<?(?P<a>ADDR)>?\s*$", r"^(?P<d>undeliverable)\s+to\s+<?(?P<a>ADDR)>?\s*$"),
    ),
    ProseFormat(
        name="transcript-only",  # InterScan MSS and similar: only the SMTP exchange is shown
        markers=(r"Sent <<< RCPT TO:",),
        rcpt=(r"Sent <<< RCPT TO:\s*<(?P<a>ADDR)>",),
    ),
    ProseFormat(
        name="ezweb",  # au EZweb
        markers=(r"Each of the following recipients was rejected by a remote",),
        rcpt=(r"^\s*Recipient: <(?P<a>ADDR)>", r"^<(?P<a>ADDR)>\s*$"),
        end=(r"^-{20,}\s*$",),
    ),
    ProseFormat(
        name="m-filter",  # Digital Arts m-FILTER
        markers=(r"m-FILTER",),
        rcpt=(r"^(?P<a>ADDR)\s*$",),
    ),
    ProseFormat(
        name="mailmarshal",  # MailMarshal: reason first, then "The following recipients were affected:"
        markers=(r"The following recipients were affected:",),
        begin=r"Could not be delivered because of|The following recipients were affected",
        rcpt=(r"^\s+<?(?P<a>ADDR)>?\s*$",),
        reason_first=True,
        end=(r"^Additional Information",),
    ),
    ProseFormat(
        name="message-details",  # Verizon and other webmail: "Error message below: ... Message details: RCPT TO: addr"
        markers=(r"Error message below:",),
        rcpt=(r"^\s*RCPT TO:\s*<?(?P<a>ADDR)>?\s*$",),
        reason_first=True,
    ),
    ProseFormat(
        name="x6",  # "We had trouble delivering your message. Full details follow:"
        markers=(r"We had trouble delivering your message",),
        rcpt=(
            r"returned (?:permanent|temporary) errors: (?P<a>ADDR)\s+Reason:\s*(?P<d>.*)$",
            r"rejected recipient <(?P<a>ADDR)>(?P<d>.*)$",
        ),
        delayed=r"returned temporary errors",
    ),
    ProseFormat(
        name="fml",  # fml mailing-list manager refusing a post
        markers=(r"You are not a member of this mailing list", r"Duplicated Message-ID in <"),
        rcpt=(r"not a member of this mailing list <(?P<a>ADDR)>", r"Duplicated Message-ID in <(?P<a>ADDR)>"),
    ),
    # Shapes many unnamed MTAs share, tried after every named family.
    ProseFormat(
        name="labelled",  # "Intended recipient: addr", "Failed recipient: addr"
        markers=(r"^\s*(?:(?:Intended|Original|Failed|Final|Invalid)\s+)?recipient(?:\(s\))?\s*:\s*<?ADDR",),
        rcpt=(r"^\s*(?:(?:Intended|Original|Failed|Final|Invalid)\s+)?recipient(?:\(s\))?\s*:\s*<?(?P<a>ADDR)>?\s*(?P<d>.*)$",),
    ),
    ProseFormat(
        name="list",  # a sentence ending in "the following recipients:" (or "...to:"), then the addresses one per line
        markers=(_LIST_INTRO,),
        begin=_LIST_INTRO,
        rcpt=(
            r"^\s*(?:[-*]+\s*)?<?(?P<a>ADDR)>?:?\s*$",
            r"^\s*(?:[-*]+\s*)?(?:\"[^\"]*\"|[^<>@\":]*)\s*<(?P<a>ADDR)>:?\s*$",  # with a display name
            r"^\s*<(?P<a>ADDR)>:\s*(?P<d>.*)$",
        ),
        delayed=r"has not yet been delivered|will continue to (?:be made|attempt|try)|This is (?:just )?a warning",
    ),
)

