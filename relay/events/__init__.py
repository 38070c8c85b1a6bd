"""Provider events: what happens to a message after an upstream took it.

Each provider's webhook (SES through SNS, SendGrid, Mailgun, SparkPost, Postmark) is
verified and read by its own module into `ProviderEvent`s (`model`), one vocabulary for
all; `service` matches them to messages and applies their effects (timeline, recipient
status, suppression, bounce report, re-send through another upstream), and `outbox`
passes them on, signed, to the applications' webhooks.
"""
