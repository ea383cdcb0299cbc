"""``[guard]``: the thresholds of the reputation guard (:mod:`fastmta.delivery.brakes`).

The defaults come from what the mailbox providers and the large sending
services publish, not from taste:

* **hard bounces**: Amazon SES puts an account under review at a 5% bounce
  rate (and may pause it at 10%); it asks to stay under 2%. A campaign over
  5% after 500 first attempts is paused (500: below that, a few bad rows at
  the head of a list are noise);
* **complaints**: Gmail's sender guidelines (Feb 2024) ask bulk senders to
  keep the spam rate under 0.1% and never let it reach 0.3%; Yahoo's Sender
  Hub names the same 0.3%. A campaign over 0.3% of its deliveries is paused;
* **blocklist / reputation replies** (category ``reputation_block``) from
  two or more providers mean the sender, not one receiver, is the problem.

Per egress source, reputation blocks at one provider take that source out of
rotation for that provider; it is probed (one transaction) after
``probe_after`` seconds, and the wait doubles after each refused probe up to
``probe_max``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["GuardConfig"]

Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Count = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class GuardConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[guard]``: when a campaign is paused and a source taken out of rotation. KPIs are always kept."""

    #: False: KPIs only, no brake acts (no pause, no rotation).
    enabled: bool = True
    #: A campaign's rates are judged once this many recipients were attempted (again after each resume).
    min_attempts: Count = 500
    #: Pause a campaign whose hard bounces (suspected filter bounces excluded) exceed this share of attempts.
    max_hard_bounce_rate: Rate = 0.05
    #: Pause a campaign whose complaints exceed this share of its deliveries (Gmail / Yahoo: 0.3%).
    max_complaint_rate: Rate = 0.003
    #: Pause a campaign that drew reputation / blocklist replies at this many providers...
    block_providers: Count = 2
    #: ... counting a provider once it sent this many such replies for the campaign.
    block_min_replies: Count = 3
    #: Take an egress source out of rotation at a provider that refuses it for its reputation.
    source_rotation: bool = True
    #: ... after this many reputation replies within the last hour...
    source_min_blocks: Count = 5
    #: ... making at least this share of the source's outcomes there in that hour.
    source_block_share: Rate = 0.10
    #: A source out of rotation is probed with one transaction after this long (seconds)...
    probe_after: Seconds = 3600.0
    #: ... the wait doubling after each refused probe, up to this.
    probe_max: Seconds = 86400.0
    #: Reasons named in a pause event.
    top_reasons: Count = 5
