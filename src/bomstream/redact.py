"""The last line of defence for credentials in log output.

The gateway's own log calls never include a token, and the access log drops
``token``/``ticket`` query values. But other code logs too: aiohttp logs a
malformed request line verbatim (``?token=...`` included) when it cannot
parse it. So every formatted log line passes through :func:`Redactor.redact`
before it is written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[redacted]"

# ``token=...``/``ticket=...`` anywhere (a query string inside an error message),
# ``Bearer ...`` (a header line), and anything shaped like a JWT.
_PATTERNS = (
    re.compile(r"(?i)\b((?:access_)?token|ticket)=[^&\s'\"\\;#]+"),
    re.compile(r"(?i)\b(bearer)\s+[^\s'\"\\,]+"),
    re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
)
# A configured secret shorter than this is not searched for: it would
# redact ordinary words.
MIN_SECRET_LEN = 8


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        literal = sorted({s for s in secrets if len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(re.escape, literal))) if literal else None

    def redact(self, text: str) -> str:
        if self._secrets is not None:
            text = self._secrets.sub(REDACTED, text)
        key, bearer, jwt = _PATTERNS
        text = key.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
        text = bearer.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
        return jwt.sub(REDACTED, text)
