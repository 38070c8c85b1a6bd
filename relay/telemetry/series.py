"""What the per-minute stats cells mean: every series, its label, and the bucket codes.

The writer (`relay.telemetry.rollup`) and the reader (`relay.telemetry.stats`) both take
their vocabulary from here, so a cell written by one release of one host is read the same
way by every other. A cell is `StatPoint(minute, series, label, bucket, value)`; values
add up across processes and hosts, so everything here is a count (no minimum, no maximum,
no average: those would not survive being added).

Histograms use fixed log-scale buckets, the same for every series and every process:
bucket 0 holds values below `BASE` seconds, and bucket i >= 1 holds
[BASE * GROWTH**(i-1), BASE * GROWTH**i), four buckets per doubling. A value's bucket is
therefore known without any coordination, and adding two histograms is adding cells.
"""

from __future__ import annotations

import math

# -- series (label format in the comment) ----------------------------------------------------
RECEIVED = "received"  # result: accepted | deferred | refused_<class> (see telemetry.smtp)
FINISHED = "finished"  # "<kind>:<state>": kind outbound|inbound, state sent|failed|bounced
DEFERRED = "deferred"  # kind
ATTEMPT = "attempt"  # "<upstream>:<outcome>": accepted|transient|permanent|refused
LATENCY = "latency"  # upstream; a histogram of attempt durations (seconds)
QUEUE_TIME = "queue_time"  # kind; a histogram of arrival-to-final-state times (seconds)
INBOUND = "inbound"  # outcome: queued|duplicate|unusable|delivered|deferred|failed
# "<upstream>:<event>": a provider's webhook event (delivered, bounced, complained, ...;
# "unmatched" when it named no message here), and recipients requeued from an upstream.
PROVIDER_EVENT = "provider_event"
REQUEUED = "requeued"  # upstream

# -- bucket codes ----------------------------------------------------------------------------
#: The bucket of a plain counter cell (histogram cells use bucket indexes >= 0).
COUNT = -1

# -- histogram buckets -----------------------------------------------------------------------
BASE = 0.001  # seconds: the upper bound of bucket 0
PER_DOUBLING = 4
GROWTH = 2.0 ** (1.0 / PER_DOUBLING)
#: The last bucket, which also takes anything larger: BASE * 2**40 s is about 35 years.
MAX_BUCKET = 40 * PER_DOUBLING + 1


def bucket_of(seconds: float) -> int:
    """The histogram bucket that counts `seconds`."""
    if seconds < BASE:  # also NaN-free negatives from a clock that stepped back
        return 0
    return min(MAX_BUCKET, int(math.log2(seconds / BASE) * PER_DOUBLING) + 1)


def bucket_bounds(index: int) -> tuple[float, float]:
    """[low, high) of bucket `index`, in seconds."""
    if index <= 0:
        return 0.0, BASE
    return BASE * GROWTH ** (index - 1), BASE * GROWTH**index


def bucket_value(index: int) -> float:
    """The value that stands for bucket `index` in estimates: its geometric midpoint (half
    of BASE for bucket 0). Any value in the bucket is within a factor sqrt(GROWTH), about
    9 %, of it."""
    if index <= 0:
        return BASE / 2
    low, high = bucket_bounds(index)
    return math.sqrt(low * high)


def attempt_label(upstream: str, outcome: str) -> str:
    return f"{upstream}:{outcome}"


def split_label(label: str) -> tuple[str, str]:
    """("ses", "accepted") from "ses:accepted": the last colon splits, so an upstream name
    may contain colons."""
    head, _, tail = label.rpartition(":")
    return head, tail
