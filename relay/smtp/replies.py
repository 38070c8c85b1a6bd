"""SMTP replies the relay sends, with enhanced status codes (RFC 3463), in one place.

Each says what went wrong and what the client (or its operator) can do about it.
"""

QUEUED = "250 2.0.0 Ok: queued as {id}"
SENDER_OK = "250 2.1.0 Sender ok"
RECIPIENT_OK = "250 2.1.5 Recipient ok"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
RELAY_DENIED = (
    "554 5.7.1 Relay access denied: {ip} is not in a trusted network; authenticate with AUTH first"
)
AUTH_NOT_OFFERED = "502 5.5.1 AUTH is not offered on this port"
AUTH_TOO_MANY = "421 4.7.0 Too many failed authentication attempts; closing connection"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
SENDER_NOT_ALLOWED = (
    "553 5.7.1 Sender address <{sender}> is not allowed for user {user}; use one of: {allowed}"
)
RECIPIENT_NO_DOMAIN = "553 5.1.3 Recipient address must be a full address such as user@domain"
SENDER_SYNTAX = (
    "553 5.1.7 Sender address must be a full address such as user@domain, or <> for bounces"
)
TOO_MANY_RECIPIENTS = (
    "452 4.5.3 Too many recipients (at most {limit} per message); send the rest in another message"
)
MESSAGE_TOO_BIG = "552 5.3.4 Message too big: at most {limit} bytes are accepted"
BARE_LINE_ENDING = (
    "550 5.6.11 Message rejected: it contains a bare CR or LF; lines must "
    "end with CRLF (RFC 5321 section 2.3.8). Fix the sending software"
)
QUEUE_FULL = (
    "452 4.3.1 Insufficient system storage: the relay's queue is nearly full; try again later"
)
QUEUE_ERROR = "451 4.3.0 Could not store the message (queue write failed); try again later"
# RFC 5321 3.8: the service is shutting down (then the connection closes; relay.smtp.drain).
SHUTTING_DOWN = "421 4.3.2 {hostname} shutting down, try again later"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
DATA_SYNTAX = "501 5.5.4 Syntax: DATA"
DATA_GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>"

#: Enhanced codes added to the library's plain replies that lack one.
ENHANCED_DEFAULTS = {
    "221": "2.0.0",
    "250": "2.0.0",
    "421": "4.7.0",
    "451": "4.3.0",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.5.0",
    "555": "5.5.4",
}

# -- envelope syntax (RFC 5321 4.1.2, RFC 6531 3.3) ---------------------------------------
RECIPIENT_SYNTAX = "553 5.1.3 Recipient address is not valid (RFC 5321 section 4.1.2)"
SENDER_NEEDS_SMTPUTF8 = (
    "553 5.6.7 Sender address is not ASCII: send MAIL FROM with the SMTPUTF8 parameter "
    "(RFC 6531 section 3.5)"
)
RECIPIENT_NEEDS_SMTPUTF8 = (
    "553 5.6.7 Recipient address is not ASCII: send MAIL FROM with the SMTPUTF8 parameter "
    "(RFC 6531 section 3.5)"
)
NULL_SENDER_NOT_ALLOWED = (
    "553 5.7.1 User {user} may not send with the null sender <>; use one of: {allowed}"
)

# -- session -------------------------------------------------------------------------------
UNKNOWN_COMMAND = "500 5.5.2 Command not recognized"
TOO_MANY_UNKNOWN = "421 4.7.0 Too many unrecognized commands; closing connection"
TOO_MANY_CONNECTIONS = "421 4.7.0 {host} Too many connections; try again later"
TOO_MANY_CONNECTIONS_FROM = "421 4.7.0 {host} Too many connections from {ip}; try again later"
INTERNAL_ERROR = "451 4.3.0 Internal error while processing the command; try again later"
#: RFC 3207 4.2: STARTTLS is not offered again once TLS is on.
ALREADY_TLS = "503 5.5.1 TLS is already active"
TLS_GO_AHEAD = "220 Ready to start TLS"
TLS_NOT_AVAILABLE = "454 4.7.0 TLS not available"
STARTTLS_SYNTAX = "501 5.5.4 Syntax: STARTTLS"

# -- AUTH (RFC 4954) -----------------------------------------------------------------------
AUTH_OK = "235 2.7.0 Authentication successful"
ALREADY_AUTHENTICATED = "503 5.5.1 Already authenticated"
AUTH_ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required: use STARTTLS before AUTH"
AUTH_SYNTAX = "501 5.5.4 Syntax: AUTH <mechanism> [initial-response]"
AUTH_UNKNOWN_MECHANISM = "504 5.5.4 Unrecognized authentication type"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64"
AUTH_PLAIN_SYNTAX = "501 5.5.2 AUTH PLAIN needs authzid NUL user NUL password"
#: RFC 4954 4: a line longer than the server accepts in the exchange.
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"
#: RFC 4616 2: the server may refuse to let one identity act as another.
AUTH_AUTHZID_REFUSED = (
    "535 5.7.8 Authentication refused: acting as another user (authorization identity) "
    "is not allowed"
)
