"""``bomstream loadtest``: open many SSE streams, publish paced events, measure.

A client process on uvloop drives its streams through raw asyncio protocols
and a hand-rolled parser, so it costs a few microseconds per delivery. With
``--workers N`` the streams are spread over N such processes (pool.py,
worker.py) and their counts merged, so the client's own CPU is not what a
run measures.
"""
