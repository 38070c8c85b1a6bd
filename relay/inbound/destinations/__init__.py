"""Inbound destinations: where a decrypted, parsed message ends up, one module per type.

Each destination is a `base.Destination` with `async deliver(raw, parsed, recipients) ->
str` (a short description of what was done, for the timeline) that raises `relay.outcomes`'
`TransientError` (retry later, with backoff) or `PermanentError` (dead-letter, no retry),
so the queue worker treats inbound and outbound failures alike (DESIGN.md invariant 3):

- `maildir`: the Maildir protocol (write in tmp/, fsync, rename into new/, fsync the
  directory), into one Maildir or one per recipient;
- `smtp` (types `smtp` and `lmtp`): forward to a downstream server through the relay's
  own client (`relay.smtpclient`); LMTP (RFC 2033, over TCP or a Unix socket: Dovecot,
  Cyrus) reads one reply per recipient after the data;
- `webhook`: an HTTP POST, multipart (a JSON part with the parsed fields, one part per
  attachment) or the raw MIME, signed with HMAC-SHA256 over `timestamp + "." + body`;
- `directory`: attachments only, as files for a document system: safe names, written
  under a hidden temporary name and then linked into place, never overwriting.

When some recipients succeed and others fail, the error raised is a `base.PartialDelivery`
(a TransientError or PermanentError) whose `delivered` lists the ones that need no retry.

Config: each type has a frozen settings dataclass in its module, built from the route's
`destination` table by `registry.build_destination_config()` with `relay.config.build`
(unknown keys, wrong types and bad values are reported with their key), and made into an
object by `registry.create_destination()`.
"""
