"""The Lua that keeps a BOM's history in a Redis Stream.

Each BOM has a stream (``<key_prefix><bom_id>``: entries ``i`` = event_id,
``d`` = the event's JSON, ``s`` = its sequence) and a hash beside it
(``...:ids``: event_id -> sequence) that makes "already stored?" one lookup.
The sequence is one counter for every BOM (``<key_prefix>:seq``; no BOM id
starts with ``:``), taken when an event is first stored: it orders events
across BOMs in publication order, as every instance sees them, so a
multi-BOM stream resumes from it even on an instance that has just started
(:mod:`bomstream.multi.catchup`). Both are capped at the
buffer size and expire ``retention_s`` after the last event. A script runs
atomically, so an event is stored at most once however many instances try,
and with ``PUBLISH`` inside the same script, history and the live channel
never disagree.

Beside them, sorted sets of BOMs by their newest event's sequence, one for
every BOM (``<key_prefix>:boms``) and one per org (``<key_prefix>:org:<org>``),
capped at ``buffer.max_boms``: a ``scope=org`` stream's catch-up on an
instance that has just started finds the org's recent BOMs there.

KEYS[1] stream, KEYS[2] ids hash, then (not on a cluster) KEYS[3] the
sequence counter and KEYS[4...] the BOM indexes; ARGV[1] event_id, ARGV[2]
JSON, ARGV[3] cap, ARGV[4] ttl in ms, ARGV[5] channel (publish only, else
''), ARGV[6] the indexes' cap, ARGV[7] bom_id.

On a Redis Cluster a script may touch only keys of one hash slot, and
SPUBLISH only a channel of that slot. So there the key names carry the
BOM's shard channel as a hash tag, ``<key_prefix>{<channel_prefix><bom_id>}``
and ``...:ids`` (e.g. ``enrichment-history:{enrichment:bom-1}``): Redis
hashes only what is between the braces, which is the channel's own name.
Without a cluster the names stay ``<key_prefix><bom_id>`` and ``...:ids``.
A counter shared by every BOM would be a key of another slot, so on a
cluster events are stored with sequence 0 (and multi-BOM streams, which need
pattern subscriptions, are not served there).
"""

from __future__ import annotations

from bomstream.events import Event

_APPEND_BODY = """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  return '', tonumber(held) or 0
end
local seq = 0
if #KEYS >= 3 then
  seq = redis.call('INCR', KEYS[3])
end
local entry = redis.call('XADD', KEYS[1], '*', 'i', ARGV[1], 'd', ARGV[2], 's', seq)
redis.call('HSET', KEYS[2], ARGV[1], seq)
local cap = tonumber(ARGV[3])
local excess = redis.call('XLEN', KEYS[1]) - cap
if excess > 0 then
  for _, old in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess)) do
    redis.call('HDEL', KEYS[2], old[2][2])
  end
  redis.call('XTRIM', KEYS[1], 'MAXLEN', cap)
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
for i = 4, #KEYS do
  redis.call('ZADD', KEYS[i], seq, ARGV[7])
  redis.call('ZREMRANGEBYRANK', KEYS[i], 0, -tonumber(ARGV[6]) - 1)
  redis.call('PEXPIRE', KEYS[i], ARGV[4])
end
return entry, seq
"""

# Returns {the new entry id, or '' when the event_id was stored already; its sequence}.
APPEND = (
    "local function append()"
    + _APPEND_BODY
    + "end\nlocal entry, seq = append()\nreturn {entry, seq}\n"
)


def _append_and(publish: str) -> str:
    """Returns {entry id or '', subscribers reached}; a repeat is not published again."""
    tail = f"""local entry, seq = append()
if entry == '' then
  return {{'', 0}}
end
return {{entry, redis.call('{publish}', ARGV[5], ARGV[2])}}
"""
    return "local function append()" + _APPEND_BODY + "end\n" + tail


APPEND_AND_PUBLISH = _append_and("PUBLISH")
APPEND_AND_SPUBLISH = _append_and("SPUBLISH")


def stream_key(key_prefix: str, bom_id: str, tag: str | None = None) -> str:
    """``tag``: the BOM's shard channel, on a Redis Cluster."""
    return key_prefix + ("{" + tag + "}" if tag is not None else bom_id)


def ids_key(key_prefix: str, bom_id: str, tag: str | None = None) -> str:
    return stream_key(key_prefix, bom_id, tag) + ":ids"


def sequence_key(key_prefix: str) -> str:
    return key_prefix + ":seq"


def index_key(key_prefix: str, org: str | None) -> str:
    """The BOMs of one org by recency, or of every org (None)."""
    return key_prefix + (":boms" if org is None else ":org:" + org)


def append_keys(key_prefix: str, event: Event, tag: str | None = None) -> list[str]:
    """The keys of one append; on a cluster (``tag``) only the BOM's own."""
    keys = [stream_key(key_prefix, event.bom_id, tag), ids_key(key_prefix, event.bom_id, tag)]
    if tag is None:
        keys += [sequence_key(key_prefix), index_key(key_prefix, None)]
        if event.org is not None:
            keys.append(index_key(key_prefix, event.org))
    return keys
