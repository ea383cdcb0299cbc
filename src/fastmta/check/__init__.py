"""``fastmta check``: lint a campaign job, a pickup file or a message before it leaves.

Content (headers, HTML, links, size, unsubscribe), authentication and
infrastructure in DNS (SPF, DKIM, DMARC, PTR, TLS at the recipients' mail
servers) and, when installed, SpamAssassin's score; see each module. One
job per module: ``sample`` (what would be sent), ``headers``, ``content``,
``html``, ``links``, ``auth``, ``infra``, ``spamassassin``, ``report``;
``run`` ties them together.

``check_campaign(path, config)`` is what ``send`` and ``serve`` run before a
campaign starts: a :class:`Report` whose ``exit_code`` is 2 when it has errors.
"""

from fastmta.check.report import Finding, Report, Severity
from fastmta.check.run import CheckOptions, check_campaign, check_path

__all__ = ["CheckOptions", "Finding", "Report", "Severity", "check_campaign", "check_path"]
