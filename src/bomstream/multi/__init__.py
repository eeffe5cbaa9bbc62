"""Streams and polls of several BOMs at once: a list of BOMs, or an org.

- :mod:`.cursor`: the ``id:`` such a stream sends, and the frames carrying it.
- :mod:`.registry`: who watches which BOMs, and the fan-out to them in arrival order.
- :mod:`.catchup`: what a new or resuming stream (or a poll) is sent first.
- :mod:`.routes`: the HTTP side, ``/api/enrichment/stream`` and ``/api/enrichment/events``.
"""
