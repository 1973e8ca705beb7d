"""Secrets never printed: one scrub for every text a job prints or logs, and URIs without credentials.

    redact(uri)       a URI without its user:password@ (what logs, run records and summaries show)
    scrub(text)       any text with credentials in URIs, Authorization headers, key=value secrets
                      and the values of the secret variables this process holds replaced by ***
    scrubbed_output() every job's stdout and stderr (and so its tracebacks, its loggers and the
                      worker logs Ray forwards to the driver) written through scrub()

`ray job logs` keeps a job's output for anyone holding the cluster's token; MLflow's errors carry
the URL they failed on. Whatever the source, what leaves the process passes through `scrub`.
"""

from __future__ import annotations

import base64
import io
import os
import re
import sys
import threading
import urllib.parse
from pathlib import Path

MASK = "***"
# Variables whose values are secrets wherever they appear (MLflow's and AWS's clients, Ray's token,
# the MLflow server's own admin password and session key).
SECRET_ENV = (
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN",
)  # fmt: skip
RAY_TOKEN_FILE = Path("~/.ray/auth_token")  # Ray's default token path (`ray get-auth-token --generate`)
MIN_SECRET_LEN = 4  # shorter values would mask ordinary words

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@'\"]+)@")
_AUTH_HEADER = re.compile(
    r"(?P<key>\bauthorization['\"]?\s*[:=]\s*['\"]?)(?:(?:basic|bearer|token|digest)\s+)?[A-Za-z0-9._~+/=-]+",
    re.IGNORECASE,
)
# key=value and "key": "value" where the key names a secret (query strings, ini lines, dict reprs).
_KEY_VALUE = re.compile(
    r"(?P<key>\b[\w.-]*(?:password|passwd|secret|token|secret_access_key|x-amz-signature|x-amz-credential)"
    r"['\"]?\s*[=:]\s*['\"]?)(?P<value>[^\s'\",;&)}\]]+)",
    re.IGNORECASE,
)
# Values a key=value match must not mask: a mode, not a secret (RAY_AUTH_MODE=token, auth_mode: token).
_NOT_SECRETS = frozenset({"token", "none", "true", "false", "null", "***"})


def redact(uri: str) -> str:
    """The URI without user:password@ (what logs, run records and summaries show)."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.password and not parts.username:
        return uri
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def credentials_of(uri: str) -> tuple[str | None, str | None]:
    """(user, password) a URI carries in its user:password@ part, percent-decoded; (None, None) if none."""
    parts = urllib.parse.urlsplit(uri)
    unquote = urllib.parse.unquote
    return (unquote(parts.username) if parts.username else None, unquote(parts.password) if parts.password else None)


def scrub(text: str) -> str:
    """`text` with every credential this module knows of replaced by ***."""
    if not text:
        return text
    for secret in _secret_values():
        if secret in text:
            text = text.replace(secret, MASK)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['key']}{MASK}", text)
    return _KEY_VALUE.sub(_mask_value, text)


def _mask_value(match: re.Match) -> str:
    if match["value"].lower() in _NOT_SECRETS:
        return match[0]
    return f"{match['key']}{MASK}"


def _secret_values() -> list[str]:
    """The secret variables' values, the basic-auth header made of MLflow's login, and Ray's token."""
    env = os.environ
    values = [env[name] for name in SECRET_ENV if env.get(name)]
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        values.append(base64.b64encode(f"{user}:{password}".encode()).decode())
    values += [token for token in (_ray_token(),) if token]
    encoded = [urllib.parse.quote(v, safe="") for v in values]
    found = {v for v in values + encoded if len(v) >= MIN_SECRET_LEN}
    return sorted(found, key=len, reverse=True)  # longest first: a secret that contains another


_RAY_TOKEN: list[str | None] = []  # read once per process


def _ray_token() -> str | None:
    if not _RAY_TOKEN:
        try:
            _RAY_TOKEN.append(RAY_TOKEN_FILE.expanduser().read_text().strip() or None)
        except OSError:
            _RAY_TOKEN.append(None)
    return _RAY_TOKEN[0]


class ScrubbedStream(io.TextIOBase):
    """A text stream that writes everything through `scrub` to the stream it wraps.

    Whole lines are scrubbed at once: text without a newline waits (up to a line's worth) for the
    rest of its line, so a secret split across two writes is still found. Everything else (fileno,
    isatty, encoding, reconfigure) is the wrapped stream's.
    """

    MAX_PENDING = 8192  # characters held back waiting for a newline; a progress bar's \r also flushes

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream
        self.pending = ""
        self.lock = threading.Lock()  # Ray's log-forwarding thread writes beside the main thread

    def write(self, text: str) -> int:
        with self.lock:
            self.pending += text
            cut = max(self.pending.rfind("\n"), self.pending.rfind("\r"))
            if cut >= 0 or len(self.pending) > self.MAX_PENDING:
                end = len(self.pending) if cut < 0 else cut + 1
                self.stream.write(scrub(self.pending[:end]))
                self.pending = self.pending[end:]
        return len(text)

    def flush(self) -> None:
        with self.lock:
            if self.pending:
                self.stream.write(scrub(self.pending))
                self.pending = ""
        self.stream.flush()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def reconfigure(self, **kwargs) -> None:
        if hasattr(self.stream, "reconfigure"):
            self.stream.reconfigure(**kwargs)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def scrubbed_output() -> None:
    """This process's stdout and stderr through `scrub` from now on (idempotent).

    Called first thing by every job, and by train workers and model actors when they start: loggers
    created later write to the scrubbed streams, and an uncaught exception's traceback is printed
    through them too. What other programs write straight to the file descriptors (Ray's own C++
    components, subprocesses) does not pass through Python and is not scrubbed.
    """
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, ScrubbedStream):
            setattr(sys, name, ScrubbedStream(stream))
