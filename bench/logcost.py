"""What the log costs per message (issue 13): `[log] format = "text"` against `"json"`,
and a level at which the message lines are off.

Run from the repository root with the project's virtualenv:

    .venv/bin/python -m bench.logcost                  # 20,000 messages, best of 5
    .venv/bin/python -m bench.logcost --messages 5000 --repeat 3

A message that goes straight out writes three INFO lines: `received` (relay.smtp),
`attempt` and `sent` (relay.dispatch). This makes those three records the way the call
sites do, with the same fields, through the handler `relay.logs.configure` installs,
into /dev/null (the cost of writing to a pipe or journald is the same for both shapes
and not the relay's). `off` is `[log] level = "warning"`: the call sites must cost next
to nothing then. Figures are microseconds of CPU per message, best of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable

from relay import logs
from relay.config import LogConfig
from relay.dispatch.outbound import _log_attempt, _sent_fields
from relay.message import Claimed, Envelope, Kind

smtp_log = logging.getLogger("relay.smtp")
dispatch_log = logging.getLogger("relay.dispatch")


def _item() -> Claimed:
    return Claimed(
        id="06H2P15P1BE9C1SPTF1Q",
        kind=Kind.OUTBOUND,
        envelope=Envelope("app@example.com", ("first@example.org",)),
        data=b"",
        created=time.time(),
        attempts=0,
        meta={},
    )


def one_message(item: Claimed) -> None:
    """The three lines of a message sent at the first try, as the call sites log them."""
    if smtp_log.isEnabledFor(logging.INFO):
        smtp_log.info(
            "%s queued from %s%s: <%s> -> %d recipient(s), %d bytes",
            item.id,
            "192.0.2.10",
            " as scanner",
            "app@example.com",
            1,
            5120,
            extra={
                "event": "received",
                "msg_id": item.id,
                "client": "192.0.2.10",
                "helo": "scanner.lan",
                "user": "scanner",
                "sender": "app@example.com",
                "recipients": ["first@example.org"],
                "size": 5120,
                "tls": "TLSv1.3",
                "listener": "0.0.0.0:587",
            },
        )
    attempt = {
        "upstream": "ses",
        "duration_ms": 41.7,
        "recipients": ["first@example.org"],
        "outcome": "accepted",
        "provider_id": "0102018f1a2b3c4d-5e6f7a8b-9c0d-1e2f-3a4b-5c6d7e8f9a0b-000000",
    }
    if dispatch_log.isEnabledFor(logging.INFO):
        _log_attempt(item.id, attempt)
    delivered = [
        {
            "upstream": "ses",
            "provider_id": attempt["provider_id"],
            "recipients": ["first@example.org"],
        }
    ]
    if dispatch_log.isEnabledFor(logging.INFO):
        dispatch_log.info(
            "%s sent via %s",
            item.id,
            "ses (0102018f1a2b3c4d)",
            extra=_sent_fields(item, delivered, now=time.time(), rounds=1),
        )


def measure(messages: int, repeat: int, run: Callable[[Claimed], None]) -> float:
    """Microseconds of CPU per message, best of `repeat`."""
    item = _item()
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(messages):
            run(item)
        best = min(best, time.process_time() - started)
    return best / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with open(os.devnull, "w") as sink:
        results = {}
        for label, settings in (
            ("text", LogConfig(format="text")),
            ("json", LogConfig(format="json")),
            ("off (level warning)", LogConfig(format="json", level="warning")),
        ):
            logs.configure(settings, stream=sink)
            results[label] = measure(args.messages, args.repeat, one_message)
    for label, micros in results.items():
        print(f"{label:>20}: {micros:6.1f} µs per message (3 lines)")
    print(f"{'json - text':>20}: {results['json'] - results['text']:+6.1f} µs per message")


if __name__ == "__main__":
    main()
