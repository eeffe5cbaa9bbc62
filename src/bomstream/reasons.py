"""Why a stream ended: the reason in its ``stream_end`` frame, its log line and
its metric label alike. A terminal event's type is a reason too."""

from __future__ import annotations

SERVER_SHUTDOWN = "server_shutdown"
MAX_DURATION = "max_duration"
TOKEN_EXPIRED = "token_expired"
FORBIDDEN = "forbidden"
SLOW_CONSUMER = "slow_consumer"
CLIENT_GONE = "client_disconnected"
