"""Shared history: the durable record every instance can answer catch-up from.

``backend`` is the interface, ``redis_stream`` and ``postgres`` the two
backends, ``recall`` the one read path that loads a BOM's history into the
hub's process buffer (coalesced, bounded, and never on the live fan-out path).
"""
