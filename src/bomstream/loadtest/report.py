"""The outcome of a run: one dict for ``--json`` and a table for people."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bomstream.loadtest.options import LoadOptions
from bomstream.loadtest.publisher import PublishStats
from bomstream.loadtest.records import ClientPart, GatewayUsage, StreamCounts

QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999))
# A client process busier than this may be measuring its own queueing.
CPU_SHARE_WARN = 0.85


@dataclass(slots=True)
class Report:
    data: dict[str, Any]

    @classmethod
    def build(
        cls,
        opts: LoadOptions,
        run_id: str,
        counts: StreamCounts,
        publish: PublishStats | None,
        parts: list[ClientPart],
        *,
        drain_s: float,
        gateway: GatewayUsage | None,
        window: tuple[float, float] | None = None,
    ) -> Report:
        c = counts
        client_cpu_s = sum(part.usage.cpu_s for part in parts)
        received = c.received
        hist = c.latency
        elapsed = (publish.elapsed + drain_s) if publish is not None else 0.0
        data: dict[str, Any] = {
            "run": run_id,
            "url": opts.url,
            "connections": {
                "target": opts.connections,
                "established": c.established,
                "boms_per_stream": opts.boms_per_stream,
                "subscriptions": c.subscriptions,
                "failed": dict(c.failed),
                "time_to_connect_s": round(c.connect_s, 3),
                "connect_rate_target": opts.connect_rate,
                "source_ips": max(1, opts.source_ips),
                "reconnects": c.reconnects,
                "stream_end_reasons": dict(c.end_reasons),
                "slow_consumers": c.slow_consumers,
                "slow_consumers_cut": c.slow_consumers_cut,
            },
            "boms": opts.boms,
            "publish": {
                "via": opts.publish_via,
                "target_rate": opts.rate,
                "duration_s": opts.duration,
                "sent": publish.sent if publish else 0,
                "failed": dict(publish.failed) if publish else {},
                "achieved_rate": round(publish.achieved_rate, 1) if publish else 0.0,
                # Unix times: publishing began, and the drain after it ended.
                "measured_window_unix": [round(t, 3) for t in window] if window else None,
            },
            "deliveries": {
                "expected": c.expected,
                "received": received,
                "lost": c.lost,
                "duplicates": c.duplicates,
                "out_of_order": c.out_of_order,
                "streams_with_loss": c.streams_with_loss,
                "misrouted": c.misrouted,
                "foreign": c.foreign,
                "per_s": round(received / elapsed, 1) if elapsed > 0 else 0.0,
                "drain_s": round(drain_s, 3),
            },
            "latency_ms": {
                **{name: round(hist.quantile(q) / 1000, 3) for name, q in QUANTILES},
                "max": round(hist.max / 1000, 3),
                "mean": round(hist.mean / 1000, 3),
                "samples": hist.count,
            },
            "latency_us_histogram": hist.to_json(),
            "bytes_received": c.bytes,
            "keepalives": c.keepalives,
            "client_cpu_s_publish": round(client_cpu_s, 3),
            "client_processes": [_part_json(part) for part in parts],
            "client_cpu_warning": _cpu_warning(parts),
        }
        if gateway is not None:
            g: dict[str, Any] = {
                "pid": gateway.pids[0],
                "pids": list(gateway.pids),
                "rss_kb_before": gateway.rss_kb_before,
                "rss_kb_connected": gateway.rss_kb_connected,
                "rss_kb_held": gateway.rss_kb_held,
                "cpu_s_connect": gateway.cpu_s_connect,
                "cpu_s_publish": gateway.cpu_s_publish,
                "rss_kb_after_publish": gateway.rss_kb_after_publish,
                "write_calls_publish": gateway.write_calls_publish,
            }
            if gateway.write_calls_publish:
                g["deliveries_per_write"] = round(received / gateway.write_calls_publish, 3)
            if c.established:
                grown = gateway.rss_kb_held - gateway.rss_kb_before
                g["rss_kb_per_stream"] = round(grown / c.established, 2)
            if c.subscriptions:
                g["rss_kb_per_subscription"] = round(grown / c.subscriptions, 3)
            if gateway.cpu_s_publish is not None and received:
                g["cpu_s_per_100k_deliveries"] = round(
                    gateway.cpu_s_publish * 100_000 / received, 3
                )
            data["gateway"] = g
        return cls(data)

    def table(self) -> str:
        d = self.data
        c, p, v, lat = d["connections"], d["publish"], d["deliveries"], d["latency_ms"]
        failed = ", ".join(f"{k}: {n}" for k, n in sorted(c["failed"].items())) or "none"
        rows = [
            ("url", d["url"]),
            ("streams", _streams_row(d)),
            ("failed", failed),
            ("time to connect", f"{c['time_to_connect_s']:.2f} s"),
            ("reconnects", str(c["reconnects"])),
            (
                "published",
                f"{p['sent']} via {p['via']}, {p['achieved_rate']:,.1f}/s"
                f" (target {p['target_rate']:,.1f}/s)",
            ),
            ("deliveries", f"{v['received']}/{v['expected']} ({v['per_s']:,.0f}/s)"),
            (
                "lost / dup / out of order",
                f"{v['lost']} / {v['duplicates']} / {v['out_of_order']}"
                f" ({v['streams_with_loss']} streams with loss)",
            ),
            (
                "latency ms",
                " ".join(f"{k} {lat[k]:.2f}" for k in ("p50", "p90", "p99", "p99_9", "max")),
            ),
            ("bytes received", f"{d['bytes_received']:,}"),
            ("client CPU (publish)", f"{d['client_cpu_s_publish']:.2f} s"),
        ]
        rows += [(f"client pid {pr['pid']}", _part_row(pr)) for pr in d["client_processes"]]
        if c["slow_consumers"]:
            rows.append(("slow consumers cut", f"{c['slow_consumers_cut']}/{c['slow_consumers']}"))
        if "gateway" in d:
            g = d["gateway"]
            rows.append(
                (
                    "gateway RSS",
                    f"{g['rss_kb_before'] / 1024:.1f} -> {g['rss_kb_held'] / 1024:.1f} MiB"
                    f" ({g.get('rss_kb_per_stream', 0):.2f} KiB/stream"
                    + (
                        f", {g.get('rss_kb_per_subscription', 0):.3f} KiB/subscription)"
                        if c["boms_per_stream"]
                        else ")"
                    ),
                )
            )
            if g.get("cpu_s_publish") is not None:
                per = g.get("cpu_s_per_100k_deliveries")
                rows.append(
                    (
                        "gateway CPU (publish)",
                        f"{g['cpu_s_publish']:.2f} s"
                        + (f" ({per:.2f} s per 100k deliveries)" if per is not None else ""),
                    )
                )
            if g.get("write_calls_publish") is not None:
                per_write = g.get("deliveries_per_write")
                rows.append(
                    (
                        "gateway writes (publish)",
                        f"{g['write_calls_publish']:,}"
                        + (f" ({per_write:.2f} deliveries each)" if per_write else ""),
                    )
                )
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {val}" for k, val in rows]
        if d["client_cpu_warning"]:
            lines.append(f"warning: {d['client_cpu_warning']}")
        return "\n".join(lines)


def _streams_row(d: dict[str, Any]) -> str:
    c = d["connections"]
    row = f"{c['established']}/{c['target']} over {d['boms']} BOMs"
    if c["boms_per_stream"]:
        row += f", {c['boms_per_stream']} a stream ({c['subscriptions']} subscriptions)"
    return row


def _part_json(part: ClientPart) -> dict[str, Any]:
    u = part.usage
    share = u.cpu_share
    out: dict[str, Any] = {
        "pid": u.pid,
        "role": u.role,
        "streams": part.counts.streams if part.counts is not None else 0,
        "cpu_s": round(u.cpu_s, 3),
        "wall_s": round(u.wall_s, 3),
        "cpu_share": round(share, 3) if share is not None else None,
    }
    if part.counts is not None:
        # The clock fields only matter for merging; the rest adds up to the totals.
        out["counts"] = {k: v for k, v in part.counts.to_json().items() if not k.endswith("_at")}
    return out


def _part_row(pr: dict[str, Any]) -> str:
    share = pr["cpu_share"]
    used = f"{share:.0%} of a core" if share is not None else "not measured"
    return (
        f"{pr['role']}, {pr['streams']} streams: CPU share {used}"
        f" ({pr['cpu_s']:.2f} CPU-s in {pr['wall_s']:.2f} s)"
    )


def _cpu_warning(parts: list[ClientPart]) -> str | None:
    busy = [p.usage for p in parts if (p.usage.cpu_share or 0.0) > CPU_SHARE_WARN]
    if not busy:
        return None
    named = ", ".join(f"pid {u.pid} at {u.cpu_share or 0.0:.0%}" for u in busy)
    return (
        f"client process CPU share above {CPU_SHARE_WARN:.0%} ({named}): the load client"
        " may be limiting this run; try more --workers"
    )
