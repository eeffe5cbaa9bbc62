"""bomstream: streams BOM enrichment progress from Redis pub/sub to browsers over SSE."""

__version__ = "0.1.0"
