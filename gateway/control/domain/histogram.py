"""HDR latency histograms on the wire and in the store: safe decoding, merging, percentiles.

The gateway sends `HdrHistogram(1, 60_000_000, 2).encode()` (base64 of a zlib-compressed V2
payload; values in microseconds). Decoding untrusted input goes through `decode()`, which checks
the headers and bounds the zlib inflation *before* handing the bytes to hdrh (whose own decoder
inflates without a limit: a 6 MB zlib bomb would become gigabytes).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import struct
import threading
import zlib
from bisect import bisect_left
from collections.abc import Iterable
from itertools import accumulate

import pyhdrh
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
# bytes with the continuation bit -> 1, others -> 0; seven 1s in a row = a varint of 8+ bytes
_CONTINUED = bytes(b >> 7 for b in range(256))
_LONG_VARINT = b"\x01" * 7
_SCRATCH_BYTES = 8 * _COUNTS_LEN
_LOCAL = threading.local()


class HistogramError(ValueError):
    """An encoded histogram is malformed, hostile or has the wrong parameters."""


def new() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def check(encoded: str | bytes) -> int:
    """Validate an untrusted wire histogram without building one; its total count, or raise
    HistogramError saying why.

    Ingest needs only this of the 50 or so histograms in a batch (the text is stored, compaction
    merges it later): the counts are decoded by hdrh's own C decoder into a scratch array, a
    twentieth of the cost of an `HdrHistogram` object.
    """
    payload = _inflate(encoded)[1]
    # A count of 2**48 or more needs a zigzag LEB128 varint of 8 bytes or more, that is at least 7
    # bytes in a row with the continuation bit; a real histogram has none (zero runs are short),
    # and without them the total cannot wrap around the decoder's 64 bits.
    if _LONG_VARINT in payload[_PAYLOAD_HEADER.size:].translate(_CONTINUED):
        raise HistogramError("has an implausible count")
    scratch = _scratch()
    try:
        found = pyhdrh.decode(payload, _PAYLOAD_HEADER.size, ctypes.addressof(scratch),
                              _COUNTS_LEN, 8)
    except Exception as exc:  # bad varints, counts past the array
        ctypes.memset(scratch, 0, _SCRATCH_BYTES)
        raise HistogramError(f"cannot be decoded ({type(exc).__name__})") from None
    ctypes.memset(scratch, 0, 8 * (found["max_nonzero_index"] + 1))   # clean for the next
    return int(found["total"])


def decode(encoded: str | bytes) -> HdrHistogram:
    """Decode an untrusted wire histogram, or raise HistogramError saying why."""
    check(encoded)
    raw_text = _inflate(encoded)[0]
    try:
        return HdrHistogram.decode(raw_text)
    except Exception as exc:  # hdrh raises assorted types for bad streams
        raise HistogramError(f"cannot be decoded ({type(exc).__name__})") from None


def _inflate(encoded: str | bytes) -> tuple[bytes, bytes]:
    """The base64 text and the inflated payload, headers checked and inflation bounded."""
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
    return raw_text, payload


def _scratch() -> ctypes.Array[ctypes.c_ulonglong]:
    """This thread's counts array for `check` and `add_all_encoded` (ingest parses in a thread
    pool). All zeros between calls: each clears what its decode wrote (up to the highest
    non-zero index), or all of it after an error."""
    arr: ctypes.Array[ctypes.c_ulonglong] | None = getattr(_LOCAL, "counts", None)
    if arr is None:
        arr = _LOCAL.counts = (ctypes.c_ulonglong * _COUNTS_LEN)()
    return arr


def decode_trusted(encoded: bytes | str | None) -> HdrHistogram:
    """Decode a histogram this service wrote itself (or a new empty one for None)."""
    if not encoded:
        return new()
    return HdrHistogram.decode(encoded)


def add_encoded(acc: HdrHistogram, encoded: bytes | str) -> int:
    """Add a histogram this service stored itself (trusted text) into `acc` without building it
    as an object: decoded into the scratch array by hdrh's C decoder and added with its C adder,
    a third of `acc.add(decode_trusted(encoded))`. Returns the count added."""
    return add_all_encoded(acc, (encoded,))


def add_all_encoded(acc: HdrHistogram, texts: Iterable[bytes | str]) -> int:
    """`add_encoded` for several histograms, `acc`'s totals and bounds updated once."""
    scratch = _scratch()
    scratch_at, counts_at = ctypes.addressof(scratch), ctypes.addressof(acc.counts)
    added, low, high = 0, _COUNTS_LEN, -1
    try:
        for encoded in texts:
            payload = zlib.decompress(base64.b64decode(encoded)[_EXT_HEADER.size:])
            found = pyhdrh.decode(payload, _PAYLOAD_HEADER.size, scratch_at, _COUNTS_LEN, 8)
            top = found["max_nonzero_index"] + 1    # counts past it are zero in both arrays
            if top:
                pyhdrh.add_array(counts_at, scratch_at, top, 8)
                ctypes.memset(scratch, 0, 8 * top)
                added += found["total"]
                low = min(low, found["min_nonzero_index"])
                high = max(high, top - 1)
    except BaseException:
        ctypes.memset(scratch, 0, _SCRATCH_BYTES)
        raise
    if added:
        acc.total_count += added
        top = acc.get_highest_equivalent_value(acc.get_value_from_index(high))
        acc.max_value = max(acc.max_value, top)
        acc.min_value = min(acc.min_value, acc.get_value_from_index(low))
    return int(added)


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
