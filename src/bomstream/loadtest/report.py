"""The outcome of a run: one dict for ``--json`` and a table for people."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bomstream.loadtest.procstat import ProcSample
from bomstream.loadtest.publisher import PublishStats

if TYPE_CHECKING:
    from bomstream.loadtest.runner import LoadTest

QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999))


@dataclass(frozen=True, slots=True)
class GatewayUsage:
    pid: int
    rss_kb_before: int
    rss_kb_connected: int
    rss_kb_held: int
    cpu_s_connect: float
    cpu_s_publish: float | None
    rss_kb_after_publish: int | None

    @classmethod
    def of(
        cls,
        pid: int | None,
        before: ProcSample | None,
        connected: ProcSample | None,
        held: ProcSample | None,
        pub_start: ProcSample | None,
        pub_end: ProcSample | None,
    ) -> GatewayUsage | None:
        if pid is None or before is None or connected is None or held is None:
            return None
        cpu_publish = None
        rss_after = None
        if pub_start is not None and pub_end is not None and pub_end is not held:
            cpu_publish = round(pub_end.cpu_s - pub_start.cpu_s, 3)
            rss_after = pub_end.rss_kb
        return cls(
            pid,
            before.rss_kb,
            connected.rss_kb,
            held.rss_kb,
            round(connected.cpu_s - before.cpu_s, 3),
            cpu_publish,
            rss_after,
        )


@dataclass(slots=True)
class Report:
    data: dict[str, Any]

    @classmethod
    def build(
        cls,
        lt: LoadTest,
        published: list[int],
        publish: PublishStats | None,
        *,
        connect_s: float,
        drain_s: float,
        client_cpu_s: float,
        gateway: GatewayUsage | None,
    ) -> Report:
        opts = lt.opts
        slow = opts.slow_consumers
        accounted = [i for i in range(opts.connections) if lt.ever_open[i] and i >= slow]
        expected = lost = received = dups = ooo = with_loss = 0
        for i in accounted:
            t = lt.tallies[i]
            want = published[i % opts.boms]
            expected += want
            missing = t.lost(want)
            lost += missing
            with_loss += missing > 0
            received += t.received
            dups += t.duplicates
            ooo += t.out_of_order
        hist = lt.latency
        elapsed = (publish.elapsed + drain_s) if publish is not None else 0.0
        data: dict[str, Any] = {
            "run": lt.run_id,
            "url": opts.url,
            "connections": {
                "target": opts.connections,
                "established": lt.established,
                "failed": dict(lt.failed),
                "time_to_connect_s": round(connect_s, 3),
                "connect_rate_target": opts.connect_rate,
                "source_ips": len(lt.sources),
                "reconnects": lt.reconnects,
                "stream_end_reasons": dict(lt.end_reasons),
                "slow_consumers": slow,
                "slow_consumers_cut": sum(lt.cut[:slow]),
            },
            "boms": opts.boms,
            "publish": {
                "via": opts.publish_via,
                "target_rate": opts.rate,
                "duration_s": opts.duration,
                "sent": publish.sent if publish else 0,
                "failed": dict(publish.failed) if publish else {},
                "achieved_rate": round(publish.achieved_rate, 1) if publish else 0.0,
            },
            "deliveries": {
                "expected": expected,
                "received": received,
                "lost": lost,
                "duplicates": dups,
                "out_of_order": ooo,
                "streams_with_loss": with_loss,
                "misrouted": lt.misrouted,
                "foreign": lt.foreign,
                "per_s": round(received / elapsed, 1) if elapsed > 0 else 0.0,
                "drain_s": round(drain_s, 3),
            },
            "latency_ms": {
                **{name: round(hist.quantile(q) / 1000, 3) for name, q in QUANTILES},
                "max": round(hist.max / 1000, 3),
                "mean": round(hist.mean / 1000, 3),
                "samples": hist.count,
            },
            "bytes_received": lt.bytes,
            "keepalives": lt.keepalives,
            "client_cpu_s_publish": round(client_cpu_s, 3),
        }
        if gateway is not None:
            g: dict[str, Any] = {
                "pid": gateway.pid,
                "rss_kb_before": gateway.rss_kb_before,
                "rss_kb_connected": gateway.rss_kb_connected,
                "rss_kb_held": gateway.rss_kb_held,
                "cpu_s_connect": gateway.cpu_s_connect,
                "cpu_s_publish": gateway.cpu_s_publish,
                "rss_kb_after_publish": gateway.rss_kb_after_publish,
            }
            if lt.established:
                grown = gateway.rss_kb_held - gateway.rss_kb_before
                g["rss_kb_per_stream"] = round(grown / lt.established, 2)
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
            ("streams", f"{c['established']}/{c['target']} over {d['boms']} BOMs"),
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
        if c["slow_consumers"]:
            rows.append(("slow consumers cut", f"{c['slow_consumers_cut']}/{c['slow_consumers']}"))
        if "gateway" in d:
            g = d["gateway"]
            rows.append(
                (
                    "gateway RSS",
                    f"{g['rss_kb_before'] / 1024:.1f} -> {g['rss_kb_held'] / 1024:.1f} MiB"
                    f" ({g.get('rss_kb_per_stream', 0):.2f} KiB/stream)",
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
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {val}" for k, val in rows)
