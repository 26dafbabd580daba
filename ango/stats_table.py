"""The table `ango stats` prints from a server's stats answer (docs/PROTOCOL.md ``stats``)."""

from __future__ import annotations

from typing import Any


def _seconds(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value * 1000:g} ms"


def _pairs(values: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v}" for k, v in sorted(values.items())) or "-"


def stats_lines(stats: dict[str, Any]) -> list[str]:
    """Lines for a person: server, allocator, claims, group commits, shards, batches."""
    server = stats.get("server", stats)  # a noop server answers with its own counters only
    metrics = stats.get("metrics", {})
    lines = [
        f"server          connections {server.get('connections', 0)}  "
        f"requests {server.get('requests', 0)}  in flight {server.get('in_flight', 0)}  "
        f"uptime {server.get('uptime_s', 0):.0f} s" + ("  (noop)" if server.get("noop") else ""),
    ]
    if "shards" in stats:
        database = stats.get("database", {})
        lines.append(
            f"allocator       shards {stats['shards_alive']}/{stats['shards']} alive  "
            f"partitions {stats['partitions']}  restarts {stats['restarts']}  "
            f"in flight {stats['in_flight']}  database "
            + ("up" if database.get("up") else f"DOWN ({database.get('error')})"))
        lines.append(f"held            leases {stats['leases_held']}  codes {stats['codes_held']}")
    cluster = stats.get("cluster")
    if cluster:
        forwarded = sum(p.get("forwarded", 0) for p in cluster.get("peers", {}).values())
        lines.append(
            f"cluster         {cluster['instance']} at {cluster['address']}  owns "
            f"{cluster['slots_owned']}/{cluster['slots']} slots (fair share "
            f"{cluster.get('fair_share')})  instances {len(cluster.get('instances_live', []))}  "
            f"map v{cluster.get('map_version')}  forwarded {forwarded}"
            + ("" if cluster.get("joined") else "  NOT JOINED"))
    if metrics:
        latency = metrics.get("claim_seconds", {})
        lines.append(f"claims          {_pairs({k: v for k, v in metrics['claims'].items() if v})}")
        lines.append(f"claim latency   p50 <= {_seconds(latency.get('p50_le'))}  "
                     f"p99 <= {_seconds(latency.get('p99_le'))}  (bucket bounds)")
        lines.append(f"connections     {_pairs(metrics.get('connections_opened', {}))} opened  "
                     f"auth failures {_pairs(metrics.get('auth_failures', {}))}  "
                     f"imported rows {metrics.get('import_rows', 0)}")
    groups = stats.get("group_commits")
    if groups:
        size, seconds = groups["size"], groups["seconds"]
        mean = f"{size['mean']:.1f}" if size["mean"] is not None else "-"
        lines.append(f"group commits   {size['count']}  mean {mean} claims  "
                     f"p99 <= {_seconds(seconds.get('p99_le'))}")
    per_shard = stats.get("per_shard") or []
    if per_shard:
        lines.append("")
        lines.append(f"{'shard':>5}  {'alive':5}  {'pid':>7}  {'served':>9}  {'groups':>7}  "
                     f"{'leases':>6}  {'codes':>7}  {'restarts':>8}")
        for s in per_shard:
            lines.append(
                f"{s.get('shard', '?'):>5}  {'yes' if s.get('alive') else 'NO':5}  "
                f"{s.get('pid', '-')!s:>7}  {s.get('claims_served', 0):>9}  "
                f"{s.get('groups', 0):>7}  {s.get('leases_held', '-')!s:>6}  "
                f"{s.get('codes_held', '-')!s:>7}  {s.get('restarts', 0):>8}")
    available = metrics.get("codes_available")
    if available:
        lines.append("")
        lines.append(f"{'batch':36}  {'available':>9}")
        for bid, n in sorted(available.items()):
            lines.append(f"{bid:36}  {n:>9}")
    return lines
