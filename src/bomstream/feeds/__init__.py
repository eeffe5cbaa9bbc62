"""The Redis feed: the subscriptions that bring workers' events into this process.

``resp`` is where a Redis is and how commands look on the wire, ``link`` one
subscription connection, ``interest`` which BOM channels are subscribed and
when (``redis.subscribe = "interest"``), ``single`` the feed from one Redis
server (pattern or interest), ``cluster`` the feed from a Redis Cluster
(sharded pub/sub, one connection per node). :mod:`bomstream.broker_redis`
puts them to work.
"""
