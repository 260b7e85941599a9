"""HDR latency histograms on the wire and in the store: safe decoding, merging, percentiles.

The gateway sends `HdrHistogram(1, 60_000_000, 2).encode()` (base64 of a zlib-compressed V2
payload; values in microseconds). Decoding untrusted input goes through `decode()`, which checks
the headers and bounds the zlib inflation *before* handing the bytes to hdrh (whose own decoder
inflates without a limit: a 6 MB zlib bomb would become gigabytes).
"""

from __future__ import annotations

import base64
import binascii
import struct
import zlib
from bisect import bisect_left
from itertools import accumulate

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 60_000_000
SIGNIFICANT_FIGURES = 2

MAX_ENCODED_CHARS = 256 * 1024
_EXT_HEADER = struct.Struct(">II")                 # cookie, compressed length
_PAYLOAD_HEADER = struct.Struct(">IIIIQQd")        # cookie, payload_len, norm, sig, low, high, ratio
_COMPRESSION_COOKIE_BASE = 0x1C849304
_ENCODING_COOKIE_BASE = 0x1C849303
_COUNTS_LEN = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES).counts_len
# Worst case of the LEB128/ZigZag counts stream: 9 bytes per counter.
_MAX_INFLATED = _PAYLOAD_HEADER.size + 9 * _COUNTS_LEN
_MAX_COUNT = 1 << 48


class HistogramError(ValueError):
    """An encoded histogram is malformed, hostile or has the wrong parameters."""


def new() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def decode(encoded: str | bytes) -> HdrHistogram:
    """Decode an untrusted wire histogram, or raise HistogramError saying why."""
    if isinstance(encoded, str):
        if len(encoded) > MAX_ENCODED_CHARS:
            raise HistogramError(f"longer than {MAX_ENCODED_CHARS} characters")
        try:
            raw_text = encoded.encode("ascii")
        except UnicodeEncodeError:
            raise HistogramError("must be base64 (ASCII)") from None
    elif isinstance(encoded, bytes):
        raw_text = encoded
    else:
        raise HistogramError("must be a string")
    try:
        raw = base64.b64decode(raw_text, validate=True)
    except (binascii.Error, ValueError):
        raise HistogramError("is not valid base64") from None
    if len(raw) < _EXT_HEADER.size:
        raise HistogramError("is too short to be an HDR histogram")
    cookie, length = _EXT_HEADER.unpack_from(raw)
    if cookie & ~0xF0 != _COMPRESSION_COOKIE_BASE or length != len(raw) - _EXT_HEADER.size:
        raise HistogramError("is not an HDR histogram (bad header)")
    inflater = zlib.decompressobj()
    try:
        payload = inflater.decompress(raw[_EXT_HEADER.size:], _MAX_INFLATED + 1)
    except zlib.error:
        raise HistogramError("has a corrupt compressed payload") from None
    if len(payload) > _MAX_INFLATED or inflater.unconsumed_tail:
        raise HistogramError("inflates beyond the size of any valid histogram")
    if not inflater.eof:
        raise HistogramError("has a truncated compressed payload")
    if len(payload) < _PAYLOAD_HEADER.size:
        raise HistogramError("has a truncated payload header")
    pcookie, plen, _norm, sig, low, high, _ratio = _PAYLOAD_HEADER.unpack_from(payload)
    if pcookie & ~0xF0 != _ENCODING_COOKIE_BASE or plen != len(payload) - _PAYLOAD_HEADER.size:
        raise HistogramError("is not an HDR histogram (bad payload header)")
    if (low, high, sig) != (LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES):
        raise HistogramError(f"must be HdrHistogram({LOWEST_US}, {HIGHEST_US}, "
                             f"{SIGNIFICANT_FIGURES}), got ({low}, {high}, {sig})")
    try:
        hist = HdrHistogram.decode(raw_text)
    except Exception as exc:  # hdrh raises assorted types for bad streams
        raise HistogramError(f"cannot be decoded ({type(exc).__name__})") from None
    counts = memoryview(hist.counts).cast("B").cast("Q")
    if hist.total_count < 0 or (hist.total_count and max(counts) >= _MAX_COUNT):
        raise HistogramError("has an implausible count")
    return hist


def decode_trusted(encoded: bytes | str | None) -> HdrHistogram:
    """Decode a histogram this service wrote itself (or a new empty one for None)."""
    if not encoded:
        return new()
    return HdrHistogram.decode(encoded)


def encode(hist: HdrHistogram) -> bytes:
    return bytes(hist.encode())


def percentiles(hist: HdrHistogram, wanted: tuple[float, ...] = (50.0, 95.0, 99.0)
                ) -> tuple[int | None, ...]:
    """Values (microseconds) at the wanted percentiles, with hdrh's semantics
    (highest equivalent value of the first bucket reaching the target count); None when empty.

    Same result as `get_percentile_to_value_dict`, ~5x faster: cumulative sums run in C."""
    total = hist.total_count
    if total <= 0:
        return tuple(None for _ in wanted)
    cumulative = list(accumulate(memoryview(hist.counts).cast("B").cast("Q")))
    out: list[int | None] = []
    for p in wanted:
        target = max(int(min(p, 100.0) * total / 100 + 0.5), 1)
        index = bisect_left(cumulative, target)
        if index >= len(cumulative):
            index = len(cumulative) - 1
        out.append(int(hist.get_highest_equivalent_value(hist.get_value_from_index(index))))
    return tuple(out)
