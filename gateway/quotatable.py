"""SharedQuotas: tenant buckets and quota counters shared by the workers of one host.

With `workers > 1` and `tenants.store: local`, every worker maps one file,
`<GATEWAY_SHARED_DIR>/tenants.table` (the supervisor's private directory), like the local limits'
`ratelimit.table`: a fixed-size open-addressing table of 32-byte slots, each a 128-bit BLAKE2b
digest and two doubles:

* a tenant's token bucket: (instant it is full again on the host-wide CLOCK_MONOTONIC, -1);
* a quota window's counter: (admitted count, wall-clock instant its window ends).

A decision holds an exclusive `flock` on the file while it reads the bucket and every window,
decides all or nothing and writes, so the whole gateway admits at most the quota per window, not
`workers` times it. A slot is free again once its bucket is full or its window has ended. The table
holds 131072 slots by default (GATEWAY_TENANT_SLOTS overrides; 4 MiB); if a probe window of 32
slots has no free slot, the slot that frees soonest is overwritten (counted in `evictions`): its
tenant restarts full or at zero, which admits more, never less.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
from typing import TYPE_CHECKING

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.ratelimit import EPSILON, open_shared_table

if TYPE_CHECKING:
    from gateway.quotawindows import Window
    from gateway.tenants import EffectivePlan

_MAGIC = b"GWTQTB01"
_HEADER_SIZE = 64
_SLOT = struct.Struct("<16sdd")
_EMPTY = bytes(16)
_BUCKET = -1.0


class SharedQuotas:
    """`take_now` as MemoryQuotas, on a table every worker of this host shares."""

    def __init__(self, path: str, *, clock: Clock = SYSTEM_CLOCK, slots: int | None = None,
                 probe: int = 32) -> None:
        self.path = path
        self._clock = clock
        if slots is None:
            try:
                slots = int(os.environ.get("GATEWAY_TENANT_SLOTS", "") or 131072)
            except ValueError:
                slots = 131072
        self._fd, self._mm, slots, probe = open_shared_table(path, _MAGIC, slots, probe,
                                                             _SLOT.size)
        self._slots = slots
        self._probe = min(probe, slots)
        self.evictions = 0

    def take_now(self, tenant: str, plan: EffectivePlan, windows: tuple[Window, ...],
                 consume: bool = True) -> tuple[bool, float, list[int]]:
        bucket_d = _digest(tenant, "b") if plan.rate > 0 else None
        window_ds = [_digest(tenant, f"{w.kind}:{w.id}") for w in windows]
        fd = self._fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            mono = self._clock.monotonic()
            wall = self._clock.time()
            claimed: set[int] = set()
            ok = True
            tokens = -1.0
            bucket_off = -1
            if bucket_d is not None:
                bucket_off, a, _, found = self._locate(bucket_d, mono, wall, claimed)
                full_at = a if found else mono
                tokens = plan.capacity - (full_at - mono) * plan.rate if full_at > mono \
                    else plan.capacity
                tokens = max(0.0, min(plan.capacity, tokens))
                ok = tokens >= 1 - EPSILON
            offs = []
            counts = []
            for (_, limit), d in zip(plan.quotas, window_ds):
                off, a, _, found = self._locate(d, mono, wall, claimed)
                n = int(a) if found else 0
                offs.append(off)
                counts.append(n)
                if n + 1 > limit:
                    ok = False
            if ok and consume:
                mm = self._mm
                if bucket_d is not None:
                    left = max(0.0, tokens - 1)
                    _SLOT.pack_into(mm, bucket_off, bucket_d,
                                    mono + (plan.capacity - left) / plan.rate, _BUCKET)
                for off, d, n, w in zip(offs, window_ds, counts, windows):
                    _SLOT.pack_into(mm, off, d, float(n + 1), w.end)
            return ok, tokens, counts
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _locate(self, digest: bytes, mono: float, wall: float,
                claimed: set[int]) -> tuple[int, float, float, bool]:
        """(offset, a, b, found): the slot holding `digest`, else a free one not `claimed` by
        this decision, else the one that frees soonest (an eviction)."""
        mm = self._mm
        slots = self._slots
        i = int.from_bytes(digest[:8], "little") % slots
        free = -1
        victim = -1
        victim_at = float("inf")
        for _ in range(self._probe):
            off = _HEADER_SIZE + i * _SLOT.size
            d, a, b = _SLOT.unpack_from(mm, off)
            if d == digest:
                live = (a > mono) if b == _BUCKET else (b > wall)
                claimed.add(off)
                return off, a, b, live
            if off not in claimed:
                if d == _EMPTY:
                    if free < 0:
                        free = off
                    break
                frees_in = (a - mono) if b == _BUCKET else (b - wall)
                if frees_in <= 0:
                    if free < 0:
                        free = off
                elif frees_in < victim_at:
                    victim, victim_at = off, frees_in
            i = i + 1 if i + 1 < slots else 0
        if free < 0:
            free = victim
            self.evictions += 1
        claimed.add(free)
        return free, 0.0, 0.0, False

    def close(self) -> None:
        if not self._mm.closed:
            self._mm.close()
            os.close(self._fd)


def _digest(tenant: str, what: str) -> bytes:
    d = hashlib.blake2b(f"{tenant}\0{what}".encode("utf-8", "surrogateescape"),
                        digest_size=16, person=b"gw-tenants").digest()
    return d if d != _EMPTY else b"\x01" + d[1:]
