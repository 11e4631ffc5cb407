"""Finding near-duplicate 64-bit perceptual hashes without comparing every pair (LSH by bands).

A hash is cut into `bands` pieces of near-equal width. Two hashes at Hamming distance d < bands
differ in at most d pieces, so by pigeonhole they agree exactly on at least one: grouping the hashes
by (band index, band value) puts every such pair in a common bucket, and only pairs inside a bucket
are compared. The work is a map (each hash to its buckets) and a reduce (each bucket to its pairs),
so buckets can be spread over partitions and machines (`partition_of`), as a shuffle does.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from itertools import combinations
from typing import Hashable, Iterable

HASH_BITS = 64


@dataclass(frozen=True)
class HashedItem:
    """One image: `ident` orders items ((shard, key): the smallest of a group is kept), `pixels` is
    the digest of its decoded pixels, `phash` its 64-bit perceptual hash."""

    ident: tuple[str, str]
    pixels: str
    phash: int


def band_values(phash: int, bands: int) -> list[int]:
    """The `bands` pieces of `phash`, widths differing by one bit at most."""
    pieces, start = [], 0
    for index in range(bands):
        width = HASH_BITS // bands + (index < HASH_BITS % bands)
        pieces.append((phash >> start) & ((1 << width) - 1))
        start += width
    return pieces


def bucket_keys(item: HashedItem, bands: int) -> list[Hashable]:
    """The buckets an item falls in: one for its exact pixels, one per band of its hash."""
    return [("pixels", item.pixels), *((index, value) for index, value in enumerate(band_values(item.phash, bands)))]


def partition_of(bucket: Hashable, partitions: int) -> int:
    """The partition (reduce task) of a bucket: a hash stable across processes (not Python's salted one)."""
    return zlib.crc32(repr(bucket).encode()) % partitions


def map_to_partitions(items: Iterable[HashedItem], bands: int, partitions: int) -> list[list[tuple[Hashable, HashedItem]]]:
    """The map side of the shuffle: (bucket, item) pairs split by the partition of the bucket."""
    out: list[list[tuple[Hashable, HashedItem]]] = [[] for _ in range(partitions)]
    for item in items:
        for bucket in bucket_keys(item, bands):
            out[partition_of(bucket, partitions)].append((bucket, item))
    return out


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def pairs_in_partition(entries: Iterable[tuple[Hashable, HashedItem]], max_distance: int) -> list[tuple[tuple, tuple, int]]:
    """The reduce side: (ident, ident, distance) of every pair in a common bucket that is a duplicate,
    distance 0 for the same pixels. A bucket of identical pixels links each member to its first, which
    is enough to join them; a band bucket compares its members pairwise (only hashes that share a band)."""
    buckets: dict[Hashable, list[HashedItem]] = {}
    for bucket, item in entries:
        buckets.setdefault(bucket, []).append(item)
    pairs = []
    for bucket, members in buckets.items():
        if bucket[0] == "pixels":
            pairs += [(members[0].ident, other.ident, 0) for other in members[1:]]
            continue
        for a, b in combinations(members, 2):
            distance = hamming(a.phash, b.phash)
            if distance <= max_distance:
                pairs.append((a.ident, b.ident, distance))
    return pairs


def duplicates_to_drop(items: Iterable[HashedItem], pairs: Iterable[tuple[tuple, tuple, int]]) -> dict[tuple, tuple[tuple, int, bool]]:
    """Joins the pairs into groups (transitively) and keeps the smallest ident of each group; returns
    every other member -> (the kept ident, Hamming distance to it, whether its pixels are the same)."""
    parent: dict[tuple, tuple] = {}

    def root(ident: tuple) -> tuple:
        while parent.get(ident, ident) != ident:
            parent[ident] = parent.get(parent[ident], parent[ident])  # path halving
            ident = parent[ident]
        return ident

    for a, b, _ in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the root is always the group's smallest ident
    by_ident = {item.ident: item for item in items}
    dropped = {}
    for ident in parent:
        kept = root(ident)
        if kept != ident:
            mine, theirs = by_ident[ident], by_ident[kept]
            dropped[ident] = (kept, hamming(mine.phash, theirs.phash), mine.pixels == theirs.pixels)
    return dropped


def find_duplicates(items: list[HashedItem], bands: int, max_distance: int) -> dict[tuple, tuple[tuple, int, bool]]:
    """`duplicates_to_drop` for items held in one process (one partition)."""
    (entries,) = map_to_partitions(items, bands, 1)
    return duplicates_to_drop(items, pairs_in_partition(entries, max_distance))

