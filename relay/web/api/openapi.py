"""The OpenAPI 3.1 document of /api/v1, served at /api/v1/openapi.json.

Written as data beside the routes (`routes.ROUTES`); the tests check that both list the
same operations and call every operation with generated valid and invalid input, so the
statuses and bodies here stay what the server answers.
"""

from __future__ import annotations

import copy
from typing import Any

from relay.message import Kind, Status
from relay.queue.base import SEARCH_KINDS, STATUS_RANK
from relay.suppression import OPERATOR_REASONS
from relay.telemetry.stats import EVENT_NAMES

Schema = dict[str, Any]


def _nullable(kind: str) -> Schema:
    return {"type": [kind, "null"]}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(
    properties: dict[str, Schema], *, required: tuple[str, ...] = (), closed: bool = False
) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    schema["required"] = list(required or properties)
    if closed:
        schema["additionalProperties"] = False
    return schema


STATES = [s.value for s in Status]
KINDS = [k.value for k in Kind]
ADDRESS: Schema = {
    "type": "string",
    "minLength": 3,
    "maxLength": 998,
    "description": 'a@b, Name <a@b> or "Name, Jr" <a@b>',
}
TEXT_FILTER: Schema = {"type": "string", "maxLength": 320}
TIME_FILTER: Schema = {
    "type": "string",
    "description": "epoch seconds, or an ISO 8601 time (UTC when it names no zone)",
}
MESSAGE_ID: Schema = {"type": "string", "pattern": "^[0-9A-Z]{1,40}$"}

WINDOW: Schema = _obj(
    {
        "attempts": {"type": "integer"},
        "successes": {"type": "integer"},
        "failures": {"type": "integer"},
        "success_rate": _nullable("number"),
        "latency_p50": _nullable("number"),
        "latency_p95": _nullable("number"),
    }
)

SCHEMAS: dict[str, Schema] = {
    "Error": _obj(
        {
            "error": {"type": "string", "description": "a stable code, e.g. invalid_field"},
            "message": {"type": "string", "description": "what was wrong and what to do"},
            "field": {"type": "string", "description": "the request field at fault"},
        },
        required=("error", "message"),
    ),
    "Attachment": _obj(
        {
            "filename": {"type": "string", "minLength": 1, "maxLength": 998},
            "content_type": {
                "type": "string",
                "description": "type/subtype; default application/octet-stream",
            },
            "content": {"type": "string", "contentEncoding": "base64"},
        },
        required=("filename", "content"),
        closed=True,
    ),
    "Submission": _obj(
        {
            "from": ADDRESS,
            "to": {"type": "array", "items": ADDRESS},
            "cc": {"type": "array", "items": ADDRESS},
            "bcc": {
                "type": "array",
                "items": ADDRESS,
                "description": "envelope recipients that never appear in the headers",
            },
            "reply_to": ADDRESS,
            "subject": {"type": "string", "maxLength": 998},
            "text": {"type": "string"},
            "html": {"type": "string"},
            "headers": {
                "type": "object",
                "additionalProperties": {"type": "string", "maxLength": 998},
                "maxProperties": 50,
                "description": "extra headers; not From/To/Cc/Bcc/Subject/Date/MIME ones",
            },
            "attachments": {"type": "array", "items": _ref("Attachment")},
            "tags": {
                "type": "object",
                "additionalProperties": {"type": "string", "maxLength": 256},
                "maxProperties": 20,
                "description": "kept with the message in the queue, not in the mail",
            },
        },
        required=("from",),
        closed=True,
    ),
    "Submitted": _obj({"id": MESSAGE_ID, "created": {"type": "boolean"}}),
    "MessageSummary": _obj(
        {
            "id": MESSAGE_ID,
            "kind": {"type": "string", "enum": KINDS},
            "state": {"type": "string", "enum": STATES},
            "from": {"type": "string"},
            "to": {"type": "array", "items": {"type": "string"}},
            "subject": _nullable("string"),
            "size": {"type": "integer"},
            "created": {"type": "number"},
            "updated": {"type": "number"},
            "attempts": {"type": "integer"},
            "upstream": _nullable("string"),
            "last_error": _nullable("string"),
        }
    ),
    "MessagePage": _obj(
        {
            "messages": {"type": "array", "items": _ref("MessageSummary")},
            "next_cursor": {
                "type": ["string", "null"],
                "description": "pass as `before` for the next page; null on the last page",
            },
        }
    ),
    "Recipient": _obj(
        {
            "address": {"type": "string"},
            "state": {
                "type": "string",
                "enum": ["pending", "sent", "failed", *STATUS_RANK],
                "description": "after `sent`, what the provider's events reported",
            },
            "upstream": _nullable("string"),
            "provider_id": _nullable("string"),
            "reason": _nullable("string"),
            "at": _nullable("number"),
        }
    ),
    "Event": {
        "type": "object",
        "properties": {"at": {"type": "number"}, "type": {"type": "string"}},
        "required": ["at", "type"],
        "description": "one timeline entry; the other keys depend on the type",
    },
    "MessageDetail": {
        "allOf": [
            _ref("MessageSummary"),
            _obj(
                {
                    "recipients": {"type": "array", "items": _ref("Recipient")},
                    "headers": {
                        "type": ["object", "null"],
                        "additionalProperties": _nullable("string"),
                        "description": "From, To, Cc, Reply-To, Subject, Date, Message-ID"
                        " (null once the bytes are gone)",
                    },
                    "body_stored": {"type": "boolean"},
                    "queue_time": {"type": "number"},
                    "next_attempt": _nullable("number"),
                    "provider_id": _nullable("string"),
                    "tags": {"type": ["object", "null"]},
                    "timeline": {"type": "array", "items": _ref("Event")},
                }
            ),
        ]
    },
    "Events": _obj({"id": MESSAGE_ID, "events": {"type": "array", "items": _ref("Event")}}),
    "ActionResult": _obj(
        {
            "id": MESSAGE_ID,
            "action": {"type": "string", "enum": ["retry", "hold", "release", "delete"]},
            "state": {"type": ["string", "null"], "enum": [*STATES, None]},
            "deleted": {"type": "boolean"},
            "probing": {
                "type": "array",
                "items": {"type": "string"},
                "description": "upstreams whose open breaker probes now",
            },
        }
    ),
    "Flushed": _obj(
        {
            "flushed": {"type": "array", "items": MESSAGE_ID},
            "count": {"type": "integer"},
            "probing": {"type": "array", "items": {"type": "string"}},
        }
    ),
    "RetryFilter": _obj(
        {
            "state": {"type": "string", "enum": ["failed", "deferred", "held"]},
            "kind": {"type": "string", "enum": KINDS},
            "sender": TEXT_FILTER,
            "recipient": TEXT_FILTER,
            "subject": TEXT_FILTER,
            "upstream": TEXT_FILTER,
            "since": {"type": ["string", "number"]},
            "until": {"type": ["string", "number"]},
            "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
        },
        required=(),
        closed=True,
    ),
    "Retried": _obj(
        {
            "retried": {"type": "array", "items": MESSAGE_ID},
            "count": {"type": "integer"},
            "skipped": {"type": "object", "additionalProperties": {"type": "string"}},
            "more": {"type": "boolean"},
            "probing": {"type": "array", "items": {"type": "string"}},
        }
    ),
    "Window": WINDOW,
    "Upstream": _obj(
        {
            "name": {"type": "string"},
            "type": {"type": "string"},
            "priority": {"type": "integer"},
            "weight": {"type": "integer"},
            "max_rate": {"type": "number"},
            "health": {"type": "number", "minimum": 0, "maximum": 1},
            "breaker": {"type": "string", "enum": ["closed", "open", "half-open"]},
            "next_probe": _nullable("number"),
            "paused": {"type": "boolean"},
            "in_flight": {"type": "integer"},
            "last_error": _nullable("string"),
            "latency_ewma": _nullable("number"),
            "attempts": {"type": "integer"},
            "successes": {"type": "integer"},
            "failures": {"type": "integer"},
            "windows": _obj({"5m": _ref("Window"), "1h": _ref("Window")}),
            "events_enabled": {
                "type": "boolean",
                "description": "whether its event webhooks are taken (POST /webhooks/<name>)",
            },
            "events": {
                "type": "object",
                "description": "what its event webhooks reported, per window (1h, 24h), once"
                " it reported anything",
                "additionalProperties": _ref("EventWindow"),
            },
        }
    ),
    "EventWindow": _obj(
        {
            **{name: {"type": "integer"} for name in (*EVENT_NAMES, "requeued", "accepted")},
            "bounce_rate": {
                **_nullable("number"),
                "description": "hard bounces ÷ messages it accepted in the window",
            },
            "complaint_rate": {
                **_nullable("number"),
                "description": "complaints ÷ messages it accepted in the window",
            },
        }
    ),
    "Upstreams": _obj({"upstreams": {"type": "array", "items": _ref("Upstream")}}),
    "UpstreamResult": _obj({"upstream": _ref("Upstream")}),
    "Stats": {
        "type": "object",
        "properties": {
            "window": {"type": "string", "enum": ["1h", "24h", "7d"]},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "oldest_age": _nullable("number"),
            "since": {"type": "number"},
            "until": {"type": "number"},
            "step": {"type": "number"},
            "series": {
                "type": "array",
                "items": _obj(
                    {
                        "start": {"type": "number"},
                        "received": {"type": "number"},
                        "sent": {"type": "number"},
                        "deferred": {"type": "number"},
                        "failed": {"type": "number"},
                    }
                ),
            },
            "queue_time": _obj({k: _nullable("number") for k in ("p50", "p95", "p99", "max")}),
            "upstreams": {"type": "object", "additionalProperties": _ref("Window")},
            "inbound": {"type": "object", "additionalProperties": {"type": "number"}},
            "slowest_upstream": _nullable("string"),
        },
        "required": ["window", "counts", "oldest_age", "series", "queue_time", "upstreams"],
    },
    "Suppression": _obj(
        {
            "address": {"type": "string"},
            "scope": {
                "type": "string",
                "description": 'the sender domain it applies to; "" for every sender',
            },
            "reason": {"type": "string", "enum": list(OPERATOR_REASONS)},
            "source": {
                "type": "string",
                "description": "the provider event, or who added it (cli:<user>, web:<token>)",
            },
            "created": {"type": "number"},
            "expires": _nullable("number"),
            "detail": {"type": "string"},
        }
    ),
    "SuppressionPage": _obj(
        {
            "suppressions": {"type": "array", "items": _ref("Suppression")},
            "next_cursor": {
                "type": ["string", "null"],
                "description": "pass as `after` for the next page; null on the last page",
            },
        }
    ),
    "NewSuppression": _obj(
        {
            "address": {"type": "string", "minLength": 3, "maxLength": 320},
            "reason": {"type": "string", "enum": list(OPERATOR_REASONS)},
            "scope": {
                "type": "string",
                "maxLength": 253,
                "description": "only for mail from this sender domain; default every sender",
            },
            "expires": {
                "type": ["string", "number"],
                "description": "forget it after this long (30d, 12h, seconds); default never",
            },
            "detail": {"type": "string", "maxLength": 1000},
        },
        required=("address",),
        closed=True,
    ),
    "SuppressionAdded": _obj({"suppression": _ref("Suppression")}),
    "SuppressionRemoved": _obj(
        {
            "address": {"type": "string"},
            "scope": _nullable("string"),
            "removed": {"type": "integer", "minimum": 1},
        }
    ),
    "Index": _obj(
        {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "api": {"type": "string"},
            "openapi": {"type": "string"},
            "endpoints": {
                "type": "array",
                "items": _obj(
                    {
                        "method": {"type": "string"},
                        "path": {"type": "string"},
                        "role": {"type": "string", "enum": ["none", "read", "submit", "admin"]},
                        "summary": {"type": "string"},
                    }
                ),
            },
        }
    ),
}

ERRORS = {
    "400": "a parameter or field is wrong (`field` names it)",
    "401": "no token, or not one of [[web.tokens]]",
    "403": "the token's role may not do this, or no token is configured at all",
    "404": "no such message, upstream or suppressed address",
    "409": "the message is not in a state this action applies to",
    "410": "the message's bytes are gone (dropped once sent)",
    "413": "the body or the message is larger than smtp.max_message_size allows",
    "415": "the Content-Type is not one this endpoint takes",
    "422": "a recipient is on the suppression list (`field` names it); nothing was queued",
    "503": "the queue cannot take or read messages now; retry after Retry-After seconds",
}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _responses(ok: str, schema: str, description: str, *errors: str) -> Schema:
    responses: Schema = {ok: _json(_ref(schema), description)}
    for code in ("401", "403", "503", *errors):
        responses[code] = _json(_ref("Error"), ERRORS[code])
    return responses


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema}


ID_PARAM = _path("id", {"type": "string"})
NAME_PARAM = _path("name", {"type": "string"})
FILTER_PARAMS = [
    _query("state", {"type": "string", "enum": STATES}, "the message's state"),
    _query(
        "kind",
        {"type": "string", "enum": list(SEARCH_KINDS)},
        "outbound mail, inbound work, or bounce (the relay's own DSNs)",
    ),
    _query("sender", TEXT_FILTER, "envelope sender contains this (any case)"),
    _query("recipient", TEXT_FILTER, "an original recipient contains this (any case)"),
    _query("subject", TEXT_FILTER, "the subject contains this (any case)"),
    _query("upstream", TEXT_FILTER, "the upstream that took it or last tried it"),
    _query("since", TIME_FILTER, "received at or after"),
    _query("until", TIME_FILTER, "received before"),
    _query("before", {"type": "string", "pattern": "^[0-9A-Z]{1,40}$"}, "the cursor: next_cursor"),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "page size (default 50)"),
]


def _action(summary: str, description: str) -> Schema:
    return {
        "summary": summary,
        "description": description + " Recorded on the timeline with the token as the actor.",
        "parameters": [ID_PARAM],
        "responses": _responses("200", "ActionResult", "done", "404", "409"),
    }


def _upstream_action(summary: str) -> Schema:
    return {
        "summary": summary,
        "parameters": [NAME_PARAM],
        "responses": _responses("200", "UpstreamResult", "the upstream after the change", "404"),
    }


PATHS: dict[str, dict[str, Schema]] = {
    "/api/v1": {
        "get": {
            "summary": "The API's version and endpoints",
            "security": [],
            "responses": {"200": _json(_ref("Index"), "version and endpoints")},
        }
    },
    "/api/v1/openapi.json": {
        "get": {
            "summary": "This document",
            "security": [],
            "responses": {
                "200": {"description": "the OpenAPI document", "content": {"application/json": {}}}
            },
        }
    },
    "/api/v1/messages": {
        "post": {
            "summary": "Submit a message",
            "description": "Role submit or admin. A JSON message built into MIME, or a whole"
            " message (message/rfc822) with the envelope in ?from= and ?to=. The same rules as"
            " SMTP apply: the token's allowed_senders, smtp.max_recipients,"
            " smtp.max_message_size. 202 only once the message is durably queued. With an"
            " Idempotency-Key, a repeat within 24 hours answers 200 with the first id.",
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
                },
                _query("from", {"type": "string"}, "raw only: the envelope sender (<> for none)"),
                {
                    "name": "to",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "array", "items": {"type": "string"}},
                    "style": "form",
                    "explode": True,
                    "description": "raw only: an envelope recipient (repeat for more)",
                },
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _ref("Submission")},
                    "message/rfc822": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "responses": {
                "202": _json(_ref("Submitted"), "queued durably"),
                "200": _json(_ref("Submitted"), "an earlier request with this key queued it"),
                **{
                    code: _json(_ref("Error"), ERRORS[code])
                    for code in ("400", "401", "403", "413", "415", "422", "503")
                },
            },
        },
        "get": {
            "summary": "Search messages, newest first",
            "parameters": FILTER_PARAMS,
            "responses": _responses("200", "MessagePage", "a page of messages", "400"),
        },
    },
    "/api/v1/messages/retry": {
        "post": {
            "summary": "Retry every message a filter matches",
            "description": "Role admin. Default: the failed ones; at most `limit` (1000) per"
            " call, `more` says whether others match. Each is recorded on its timeline.",
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": _ref("RetryFilter")}},
            },
            "responses": _responses("200", "Retried", "queued again", "400", "413", "415"),
        }
    },
    "/api/v1/messages/{id}": {
        "get": {
            "summary": "One message: envelope, state, recipients, headers, timeline",
            "parameters": [ID_PARAM],
            "responses": _responses("200", "MessageDetail", "the message", "404"),
        },
        "delete": _action("Delete a message", "Role admin."),
    },
    "/api/v1/messages/{id}/events": {
        "get": {
            "summary": "The message's timeline",
            "parameters": [ID_PARAM],
            "responses": _responses("200", "Events", "its events, oldest first", "404"),
        }
    },
    "/api/v1/messages/{id}/raw": {
        "get": {
            "summary": "The stored bytes (role admin)",
            "parameters": [ID_PARAM],
            "responses": {
                "200": {
                    "description": "the message as queued",
                    "content": {
                        "message/rfc822": {"schema": {"type": "string", "format": "binary"}}
                    },
                },
                **{
                    code: _json(_ref("Error"), ERRORS[code])
                    for code in ("401", "403", "404", "410", "503")
                },
            },
        }
    },
    "/api/v1/messages/{id}/retry": {
        "post": _action("Make a failed, deferred or held message due now", "Role admin.")
    },
    "/api/v1/messages/{id}/hold": {
        "post": _action("Hold a queued or deferred message", "Role admin.")
    },
    "/api/v1/messages/{id}/release": {"post": _action("Release a held message", "Role admin.")},
    "/api/v1/queue/flush": {
        "post": {
            "summary": "Make every deferred message due now (role admin)",
            "responses": _responses("200", "Flushed", "the messages made due"),
        }
    },
    "/api/v1/upstreams": {
        "get": {
            "summary": "Every upstream: priority, health, breaker, in flight, rates, latency",
            "responses": _responses("200", "Upstreams", "the upstreams"),
        }
    },
    "/api/v1/upstreams/{name}/pause": {
        "post": _upstream_action("Pause an upstream: no new attempts until resumed (role admin)")
    },
    "/api/v1/upstreams/{name}/resume": {"post": _upstream_action("Resume a paused upstream")},
    "/api/v1/stats": {
        "get": {
            "summary": "Counts, throughput, queue time and upstream rates over a window",
            "parameters": [
                _query("window", {"type": "string", "enum": ["1h", "24h", "7d"]}, "default 1h")
            ],
            "responses": _responses("200", "Stats", "the figures", "400"),
        }
    },
    "/api/v1/suppressions": {
        "get": {
            "summary": "The suppression list in address order",
            "description": "Addresses the relay will not mail (hard bounces, complaints, and"
            " what operators added), with why, since when and until when.",
            "parameters": [
                _query("search", TEXT_FILTER, "the address contains this (any case)"),
                _query("after", TEXT_FILTER, "the cursor: next_cursor of the previous page"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "default 100"),
            ],
            "responses": _responses("200", "SuppressionPage", "a page of entries", "400"),
        },
        "post": {
            "summary": "Suppress an address (role admin)",
            "description": "Added (or renewed) at once: this relay refuses it from the next"
            " RCPT TO, the other processes within seconds. The token is its source.",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("NewSuppression")}},
            },
            "responses": _responses("201", "SuppressionAdded", "on the list", "400", "413", "415"),
        },
    },
    "/api/v1/suppressions/{address}": {
        "delete": {
            "summary": "Lift an address's suppression (role admin)",
            "description": "Without `scope`, in every scope; with it, only that sender"
            " domain's entry (an empty scope: the entry for every sender).",
            "parameters": [
                _path("address", {"type": "string"}),
                _query("scope", {"type": "string", "maxLength": 253}, "a sender domain"),
            ],
            "responses": _responses(
                "200", "SuppressionRemoved", "taken off the list", "400", "404"
            ),
        }
    },
}


def document(version: str) -> dict[str, Any]:
    """The whole document (a new dict each time: callers may change theirs)."""
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "relay HTTP API",
                "version": version,
                "description": "Submit mail, search the queue, read timelines, act on messages"
                " and upstreams. Bearer tokens come from [[web.tokens]] (roles read, submit,"
                " admin); every error is JSON {error, message, field?}.",
            },
            "servers": [{"url": "/"}],
            "security": [{"bearer": []}],
            "paths": PATHS,
            "components": {
                "schemas": SCHEMAS,
                "securitySchemes": {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "a token of [[web.tokens]]; `relay token new` makes one",
                    }
                },
            },
        }
    )
