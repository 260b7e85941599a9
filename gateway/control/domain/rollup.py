"""Rollups: 1m / 5m / 1h / 1d buckets per (service, route) and per service (route '*').

* A batch's `interval_start` decides its bucket in every window (so late batches, accepted up to
  one day old, land where they belong): bucket_start = floor(interval_start / w) * w.
* Counts are added and saturation maxima kept at ingest, in the batch's one transaction, for all
  four windows at once (`apply`). Status 429 counts in `rate_limited`, 4xx (other than 429) in
  `error_count_4xx`, 5xx in `error_count_5xx`; every status counts in `request_count`. Series
  the gateway answered itself (`local`) count there too, and again in `local_count`, `local_4xx`,
  `local_5xx`, so that readers can report the admitted requests apart (health, signals).
  Their latencies are not queued: the histograms (p50/p95/p99, latency SLIs) are of admitted
  requests only, not diluted by a flood of 30-microsecond 429s.
* Latency histograms are exact merges: each series' HDR histogram is queued in `pending_hist` by
  `apply` and folded into the 4 windows x (route, service total) buckets by `compact`, which
  decodes each bucket's stored histogram once per pass, adds, re-encodes and stores p50/p95/p99.
  Readers call `compact` first, so what they see is always complete; a periodic job keeps the
  queue short. This keeps ingest cheap (no histogram decode/encode per batch per window).
* Retention (`run_retention`): 1m 1 day, 5m 7 days, 1h 30 days, 1d 365 days (by bucket_start).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.control.domain import histogram
from gateway.control.domain.ingest import Batch

if TYPE_CHECKING:   # the store is handed in: domain code never opens or imports it
    from gateway.control.store import HistKey, MinuteRow, Store

log = logging.getLogger("gateway.control.rollup")

WINDOWS: dict[str, int] = {"1m": 60, "5m": 300, "1h": 3_600, "1d": 86_400}
RETENTION_S: dict[int, int] = {60: 86_400, 300: 7 * 86_400, 3_600: 30 * 86_400,
                               86_400: 365 * 86_400}
BATCH_ID_RETENTION_S = 2 * 86_400      # > the 1-day late limit: replays are always recognised
REPORT_RETENTION_S = 30 * 86_400       # breaker transitions, stale gateway/upstream reports
TOTAL = "*"                            # the route of a service's total row
SHED_REASONS = ("shed", "concurrency")  # local reasons of overload protection's refusals
CHUNK = 5_000                          # queued histograms folded per compaction transaction


def bucket_start(t: float, win_s: int) -> int:
    return int(t // win_s) * win_s


def classify(code: int) -> tuple[int, int, int]:
    """(is_4xx_error, is_5xx_error, is_rate_limited) for a status code."""
    if code == 429:
        return 0, 0, 1
    if 400 <= code < 500:
        return 1, 0, 0
    if 500 <= code < 600:
        return 0, 1, 0
    return 0, 0, 0


def apply(store: Store, batch: Batch, received_at: float) -> bool:
    """Store a validated batch in one transaction; False (nothing changed) for a replay."""
    return apply_many(store, [batch], received_at)[0]


def apply_many(store: Store, batches: list[Batch], received_at: float) -> list[bool]:
    """Store validated batches in one transaction; per batch, False for a replay (of an earlier
    batch, or of one before it in the list), which changes nothing.

    The batches' counts are summed per bucket before they are written, so a group of batches of
    the same minute costs one upsert per (window, service, route) instead of one per batch: this
    is what lets ingest keep up with many gateways (the caller groups the batches that arrive
    while the previous transaction is being written)."""
    sums: dict[tuple[int, int, str, str], list[float]] = {}
    local: dict[tuple[int, int, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    limit_sums: dict[tuple[int, int, str, str], int] = defaultdict(int)
    retry_sums: dict[tuple[int, int, str, str], int] = defaultdict(int)
    shed_sums: dict[tuple[int, int, str, str, str], int] = defaultdict(int)
    pending: list[tuple[int, str, str, bytes]] = []
    links: dict[tuple[str, str], float] = {}
    upstream_rows: list[tuple[str, str, str, int, int, int | None, int, float]] = []
    transitions: list[tuple[str, str, str, str, float, str]] = []
    with store.transaction():
        first: dict[str, int] = {}          # a replay within the group is a replay too
        for i, b in enumerate(batches):
            first.setdefault(b.batch_id, i)
        new = store.rollups.insert_batches([(b.batch_id, b.gateway_id, b.seq, b.interval_start,
                                     b.interval_end, received_at)
                                    for b in (batches[i] for i in first.values())])
        stored = [b.batch_id in new and first[b.batch_id] == i for i, b in enumerate(batches)]
        for batch, ok in zip(batches, stored, strict=True):
            if ok:
                _add(batch, sums, local, limit_sums, retry_sums, shed_sums, pending, links)
                upstream_rows += [(batch.gateway_id, u.upstream, u.breaker_state,
                                   u.pool_in_use_max, u.pool_max, u.concurrency_limit,
                                   int(u.concurrency_saturated), batch.interval_end)
                                  for u in batch.upstreams]
                transitions += [(batch.gateway_id, t.upstream, t.from_state, t.to_state, t.at,
                                 t.reason) for t in batch.breaker_transitions]
        if not any(stored):
            return stored
        minutes: list[MinuteRow] = [
            (k[1], k[2], k[3], int(a[0]), int(a[1]), int(a[2]), int(a[3]), int(a[4]),
             int(a[5]), a[6], a[7], int(a[8]), int(a[9])) for k, a in sums.items()]
        limit_sums = _spread(limit_sums, _add_ints)
        retry_sums = _spread(retry_sums, _add_ints)
        shed_sums = _spread(shed_sums, _add_ints)
        with store.pipeline():     # the writes below read nothing back
            store.rollups.add_pending_hists(_merged(pending))
            store.rollups.add_limit_counts([(*key, n) for key, n in limit_sums.items()])
            store.fleet.report_upstreams(upstream_rows)
            store.overload.add_retry_counts([(*key, n) for key, n in retry_sums.items()])
            store.overload.add_shed_counts([(*key, n) for key, n in shed_sums.items()])
            store.fleet.link_service_upstreams([(svc, up, t) for (svc, up), t in links.items()])
            store.fleet.add_transitions(transitions)
            # the interval tells the silent-gateway check (followups.py) when to worry
            store.fleet.report_gateways([
                (b.gateway_id, b.seq, b.interval_end, b.saturation.cpu_percent,
                 b.saturation.loop_lag_max_s * 1000.0, b.saturation.inflight_max,
                 b.saturation.rss_bytes, b.interval_end - b.interval_start)
                for b, ok in zip(batches, stored, strict=True) if ok])
            # Last: the rows every replica's groups upsert (the same minute's buckets), locked
            # from here until COMMIT, which follows them in a pipelined transaction.
            windows = tuple(WINDOWS.values())
            store.rollups.add_minutes(minutes, windows)
            store.rollups.add_local_minutes([(k[1], k[2], k[3], lc[0], lc[1], lc[2])
                                             for k, lc in local.items()], windows)
    return stored


def _merged(pending: list[tuple[int, str, str, bytes]]) -> list[tuple[int, str, str, bytes]]:
    """One queued histogram per (1m bucket, service, route): the series of one key (its status
    codes and methods, the group's gateways) merged here, once, instead of each queued, read
    and folded by compaction apart. A key with one series keeps its payload as it came."""
    by_key: dict[tuple[int, str, str], list[bytes]] = defaultdict(list)
    for b1m, service, route, payload in pending:
        by_key[(b1m, service, route)].append(payload)
    out: list[tuple[int, str, str, bytes]] = []
    for (b1m, service, route), payloads in by_key.items():
        if len(payloads) == 1:
            out.append((b1m, service, route, payloads[0]))
            continue
        acc = histogram.Counts()
        for payload in payloads:
            acc.add_payload(payload)
        out.append((b1m, service, route, acc.payload()))
    return out


def _add(batch: Batch, sums: dict[tuple[int, int, str, str], list[float]],
         local: dict[tuple[int, int, str, str], list[int]],
         limit_sums: dict[tuple[int, int, str, str], int],
         retry_sums: dict[tuple[int, int, str, str], int],
         shed_sums: dict[tuple[int, int, str, str, str], int],
         pending: list[tuple[int, str, str, bytes]], links: dict[tuple[str, str], float]) -> None:
    """Add one batch's counts to the group's sums per 1m bucket (keys start with 60, b1m): the
    store (bucket counts) or `_spread` (the other counts) adds them to the larger windows once
    for the whole group."""
    sat = batch.saturation
    lag_ms = sat.loop_lag_max_s * 1000.0
    b1m = bucket_start(batch.interval_start, 60)
    for s in batch.series:
        e4, e5, rl = classify(s.code)
        for key in ((60, b1m, s.service, s.route), (60, b1m, s.service, TOTAL)):
            acc = sums.get(key)
            if acc is None:
                acc = sums[key] = [0, 0, 0, 0, 0, 0, sat.cpu_percent, lag_ms, sat.inflight_max,
                                   sat.rss_bytes]
            else:   # saturation: the highest any gateway reported in the bucket
                if sat.cpu_percent > acc[6]:
                    acc[6] = sat.cpu_percent
                if lag_ms > acc[7]:
                    acc[7] = lag_ms
                if sat.inflight_max > acc[8]:
                    acc[8] = sat.inflight_max
                if sat.rss_bytes > acc[9]:
                    acc[9] = sat.rss_bytes
            acc[0] += s.count
            acc[1] += e4 * s.count
            acc[2] += e5 * s.count
            acc[3] += rl * s.count
            acc[4] += s.bytes_in
            acc[5] += s.bytes_out
            if s.local:
                loc = local[key]
                loc[0] += s.count
                loc[1] += e4 * s.count
                loc[2] += e5 * s.count
                # overload protection's refusals per route, from the series' `local` reason
                if s.local in SHED_REASONS and key[3] != TOTAL:
                    shed_sums[(60, b1m, s.service, s.route, s.local)] += s.count
        if s.hist_total and not s.local:
            pending.append((b1m, s.service, s.route, s.latency))
        if s.upstream != "-":
            links[(s.service, s.upstream)] = max(links.get((s.service, s.upstream), 0.0),
                                                 batch.interval_end)
    for lim in batch.limits:
        limit_sums[(60, b1m, lim.policy, lim.decision)] += lim.count
    for u in batch.upstreams:
        for result, n in u.retries:
            retry_sums[(60, b1m, u.upstream, result)] += n


def _spread(minutes: dict[Any, Any], merge: Callable[[Any, Any], Any]) -> dict[Any, Any]:
    """Per-minute sums (keys (60, b1m, ...)) plus the same for every larger window, whose bucket
    of a minute is the one holding its start (windows are multiples of a minute)."""
    out = dict(minutes)
    for win in WINDOWS.values():
        if win == 60:
            continue
        for key, value in minutes.items():
            wkey = (win, bucket_start(key[1], win), *key[2:])
            have = out.get(wkey)
            out[wkey] = value if have is None else merge(have, value)
    return out


def _add_ints(a: int, b: int) -> int:
    return a + b


def compact(store: Store, *, chunk: int = CHUNK, max_chunks: int | None = None) -> int:
    """Fold queued series histograms into their buckets; return how many were folded.

    Works in transactions of `chunk` queued rows; `max_chunks` bounds one call so a periodic
    job can let ingest requests in between. Queued rows of the same (1m bucket, service, route)
    are merged first, so each target bucket is decoded, added to and re-encoded once per chunk."""
    done = 0
    chunks = 0
    while max_chunks is None or chunks < max_chunks:
        chunks += 1
        with store.transaction():
            store.rollups.lock_compaction()     # replicas: one folds a chunk at a time, never twice
            pending = store.rollups.take_pending(chunk)
            if not pending:
                return done
            per_key: dict[tuple[int, str, str], histogram.Counts] = {}
            for _id, b1m, service, route, queued in pending:
                acc = per_key.get((b1m, service, route))
                if acc is None:
                    acc = per_key[(b1m, service, route)] = histogram.Counts()
                acc.add_payload(histogram.stored_payload(queued))
            targets: dict[HistKey, list[histogram.Counts]] = defaultdict(list)
            for (b1m, service, route), h in per_key.items():
                for win in WINDOWS.values():
                    bs = bucket_start(b1m, win)
                    targets[(win, bs, service, route)].append(h)
                    targets[(win, bs, service, TOTAL)].append(h)
            updates = []
            stored = store.rollups.bucket_hists(list(targets))
            for key, parts in targets.items():
                acc = histogram.Counts.of(stored.get(key))
                for h in parts:
                    acc.add(h)
                p50, p95, p99 = acc.percentiles()
                updates.append((acc.payload(), p50, p95, p99) + key)
            store.rollups.set_bucket_hists(updates)
        done += len(pending)
        if len(pending) < chunk:
            break
    return done


def run_retention(store: Store, now: float) -> dict[str, int]:
    """Delete what is past retention (compacting first); return deleted row counts."""
    compact(store)
    deleted: dict[str, int] = {}
    for name, win in WINDOWS.items():
        deleted[name] = store.rollups.delete_buckets_before(win, now - RETENTION_S[win])
    deleted["batch_ids"] = store.rollups.delete_batches_before(now - BATCH_ID_RETENTION_S)
    deleted["reports"] = store.fleet.delete_reports_before(now - REPORT_RETENTION_S)
    if any(deleted.values()):
        log.info("retention", extra={"deleted": deleted})
    return deleted
