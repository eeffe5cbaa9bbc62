"""``bomstream loadtest``: open many SSE streams, publish paced events, measure.

One process on uvloop drives every stream through raw asyncio protocols and a
hand-rolled parser, so the client costs a few microseconds per delivery and
is not the bottleneck of what it measures.
"""
