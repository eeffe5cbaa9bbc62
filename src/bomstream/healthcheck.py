"""``bomstream health``: ask a running gateway whether it is healthy.

This is the container health check: it reads the same configuration as
``bomstream serve`` (file and ``BOMSTREAM_*`` environment), so it finds the
gateway on whatever port the deployment set, and exits 0 only on a 200.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from bomstream.config import Config

HEALTH_PATH = "/api/enrichment/health"

# A gateway listening on every address is reached over loopback.
_WILDCARD = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def health_url(cfg: Config) -> str:
    host = _WILDCARD.get(cfg.server.host, cfg.server.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.server.port}{HEALTH_PATH}"


def health_command(cfg: Config, url: str | None, timeout: float) -> int:
    target = url or health_url(cfg)
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:
            body = resp.read(4096).decode(errors="replace")
            status = resp.status
    except urllib.error.HTTPError as exc:
        body = exc.read(4096).decode(errors="replace")
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        print(f"bomstream: {target} unreachable: {exc}", file=sys.stderr)
        return 1
    print(f"{status} {body}")
    return 0 if status == 200 else 1
