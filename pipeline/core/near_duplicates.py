"""Finding near-duplicate 64-bit perceptual hashes without comparing every pair (LSH by bands).

A hash is cut into `bands` pieces of near-equal width. Two hashes at Hamming distance d < bands
differ in at most d pieces, so by pigeonhole they agree exactly on at least one: grouping the hashes
by (band index, band value) puts every such pair in a common bucket, and only pairs inside a bucket
are compared. The work is a map (each hash to its buckets) and a reduce (each bucket to its pairs),
so buckets spread over partitions and machines (`map_to_partitions`), as a shuffle does.

Cost: a bucket holds about n / 2^(64/bands) hashes of n (more where hashes cluster), and its pairs
are compared, so the work stays near-linear while 64/bands is at least about log2(n): the fewest
bands that max_distance allows (max_distance + 1) are the cheapest.

Items are numbered by `ident` (an int64: shard number << 32 | row within the shard's hashes), the
arrays go through the shuffle as numpy arrays, and each bucket's pairs are compared at once.
"""

from __future__ import annotations

import numpy as np

HASH_BITS = 64
_SHARD_SHIFT = 32
_BLOCK = 1024  # rows of a bucket's distance matrix computed at once


def ident(shard: int, row: int) -> int:
    return (shard << _SHARD_SHIFT) | row


def shard_and_row(item: int) -> tuple[int, int]:
    return item >> _SHARD_SHIFT, item & ((1 << _SHARD_SHIFT) - 1)


def band_values(hashes: np.ndarray, bands: int) -> list[np.ndarray]:
    """The `bands` pieces of each hash (uint64), widths differing by one bit at most."""
    pieces, start = [], 0
    for index in range(bands):
        width = HASH_BITS // bands + (index < HASH_BITS % bands)
        pieces.append((hashes >> np.uint64(start)) & np.uint64((1 << width) - 1))
        start += width
    return pieces


def bucket_keys(hashes: np.ndarray, bands: int) -> np.ndarray:
    """(bands, n) int64 bucket of each hash in each band: band index in the top bits, value below."""
    return np.stack([(piece.astype(np.int64) | np.int64(index << 56)) for index, piece in enumerate(band_values(hashes, bands))])


def map_to_partitions(idents: np.ndarray, hashes: np.ndarray, bands: int, partitions: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The map side of the shuffle: (bucket, ident, hash) arrays, one triple per partition; a bucket's
    partition is a fixed mix of its key, the same in every process."""
    keys = bucket_keys(hashes, bands).ravel()
    ids, values = np.tile(idents, bands), np.tile(hashes, bands)
    target = ((keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) % np.uint64(partitions)
    return [(keys[target == p], ids[target == p], values[target == p]) for p in range(partitions)]


def pairs_in_partition(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]], max_distance: int) -> np.ndarray:
    """The reduce side: (ident, ident, distance) rows, int64, of every pair within `max_distance`
    that shares a bucket of this partition (a pair sharing several buckets comes once per bucket)."""
    keys = np.concatenate([p[0] for p in pieces]) if pieces else np.empty(0, np.int64)
    ids = np.concatenate([p[1] for p in pieces]) if pieces else np.empty(0, np.int64)
    values = np.concatenate([p[2] for p in pieces]) if pieces else np.empty(0, np.uint64)
    order = np.argsort(keys, kind="stable")
    keys, ids, values = keys[order], ids[order], values[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.empty(0, np.int64)
    ends = np.r_[starts[1:], len(keys)]
    found = []
    for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        found += _bucket_pairs(ids[start:end], values[start:end], max_distance)
    return np.concatenate(found) if found else np.empty((0, 3), np.int64)


def _bucket_pairs(ids: np.ndarray, values: np.ndarray, max_distance: int) -> list[np.ndarray]:
    """A bucket's pairs. Equal hashes (a thousand blank images) are linked to their first holder,
    and the distinct ones compared in row blocks, so a crowded bucket never needs its square in memory."""
    distinct, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    same = np.flatnonzero(first[inverse] != np.arange(len(values)))
    found = [np.stack([ids[first[inverse[same]]], ids[same], np.zeros(len(same), np.int64)], axis=1)]
    holders = ids[first]
    for row in range(0, len(distinct), _BLOCK):
        distances = np.bitwise_count(distinct[row : row + _BLOCK, None] ^ distinct[None, :])
        a, b = np.nonzero(distances <= max_distance)
        later = b > a + row  # each pair once, never an item with itself
        a, b = a[later], b[later]
        found.append(np.stack([holders[row + a], holders[b], distances[a, b].astype(np.int64)], axis=1))
    return found


def duplicates_to_drop(hashes: dict[int, int], pairs: np.ndarray) -> dict[int, tuple[int, int]]:
    """Joins the pairs into groups (transitively) and keeps each group's smallest ident; returns
    every other member -> (the kept ident, Hamming distance of their hashes). `hashes`: ident -> hash."""
    parent: dict[int, int] = {}

    def root(item: int) -> int:
        while parent.get(item, item) != item:
            parent[item] = parent.get(parent[item], parent[item])  # path halving
            item = parent[item]
        return item

    for a, b, _ in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the root is always the group's smallest ident
    dropped = {}
    for item in parent:
        kept = root(item)
        if kept != item:
            dropped[item] = (kept, (hashes[item] ^ hashes[kept]).bit_count())
    return dropped


def find_duplicates(idents: np.ndarray, hashes: np.ndarray, bands: int, max_distance: int) -> dict[int, tuple[int, int]]:
    """`duplicates_to_drop` for hashes held in one process (one partition)."""
    pairs = pairs_in_partition(map_to_partitions(idents, hashes, bands, 1), max_distance)
    return duplicates_to_drop(dict(zip(idents.tolist(), hashes.tolist())), pairs)
