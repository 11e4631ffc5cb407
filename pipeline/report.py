"""`fgdata info`: what a dataset directory holds, in a few lines a person can read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import FgdataError
from pipeline.shards import MANIFEST_FILE, finished_shards, list_shards, read_json, read_rejects


def describe_dataset(dataset_dir: Path, top: int = 10) -> str:
    dataset_dir = Path(dataset_dir)
    manifest = read_json(dataset_dir / MANIFEST_FILE)
    shards = list_shards(dataset_dir)
    if manifest is None:
        done = len(finished_shards(dataset_dir))
        raise FgdataError(f"{dataset_dir} is incomplete ({done} shard(s) finished, no manifest); rerun its stage to finish it")
    lines = [
        f"{dataset_dir}  ({manifest['kind']}, written by `fgdata {manifest['stage']}`)",
        f"  shards: {len(shards)}   rows in: {manifest['rows_in']}   rows out: {manifest['rows_out']}   "
        f"rejected: {manifest['rows_rejected']}",
    ]
    rejects = read_rejects(dataset_dir).to_pylist()
    if rejects:
        lines.append("  rejects by reason:")
        examples = {}
        for reject in rejects:
            examples.setdefault(reject["reason"], reject)
        for reason, count in Counter(r["reason"] for r in rejects).most_common():
            example = examples[reason]
            lines.append(f"    {reason:<20} {count:>6}   e.g. {example['key']}: {example['detail'][:90]}")
    for name, values in manifest.get("provenance", {}).items():
        lines.append(f"  {name}: {', '.join(map(str, values))}")
    if True in manifest.get("provenance", {}).get("random_weights", []):
        lines.append("  NOTE: made by a RANDOM-WEIGHT model (offline demo/test): its output is noise")
    describe_kind = {"images": _describe_images, "phrases": _describe_phrases, "regions": _describe_regions, "fggrn": _describe_fggrn}.get(
        manifest["kind"]
    )
    if describe_kind:
        lines += describe_kind(shards, top)
    return "\n".join(lines)


def _describe_images(shards: list[Path], top: int) -> list[str]:
    formats: Counter = Counter()
    captioned = total = 0
    for shard in shards:
        table = pq.read_table(shard, columns=["format", "short_caption"])
        formats.update(table.column("format").to_pylist())
        total += table.num_rows
        captioned += table.num_rows - table.column("short_caption").null_count
    return [
        f"  formats: {', '.join(f'{name} {count}' for name, count in formats.most_common())}",
        f"  with a caption: {captioned} of {total}",
    ]


def _describe_phrases(shards: list[Path], top: int) -> list[str]:
    phrases: Counter = Counter()
    heads: Counter = Counter()
    rows = 0
    for shard in shards:
        for row_phrases in pq.read_table(shard, columns=["phrases"]).column("phrases").to_pylist():
            rows += 1
            for phrase in row_phrases:
                phrases[phrase["text"].lower()] += phrase["mentions"]
                heads[phrase["head"]] += phrase["mentions"]
    total = sum(phrases.values())
    return [
        f"  phrases: {total} ({total / max(rows, 1):.2f} per row), distinct: {len(phrases)}",
        f"  top phrases: {'; '.join(f'{text} ({count})' for text, count in phrases.most_common(top))}",
        f"  top head nouns: {', '.join(f'{head} ({count})' for head, count in heads.most_common(top))}",
    ]


def _describe_regions(shards: list[Path], top: int) -> list[str]:
    phrases: Counter = Counter()
    rows = empty = regions = 0
    for shard in shards:
        for row_regions in pq.read_table(shard, columns=["regions"]).column("regions").to_pylist():
            rows += 1
            empty += not row_regions
            regions += len(row_regions)
            phrases.update(region["phrase"].lower() for region in row_regions)
    return [
        f"  regions: {regions} ({regions / max(rows, 1):.2f} per image), images without a region: {empty}",
        f"  most grounded phrases: {'; '.join(f'{text} ({count})' for text, count in phrases.most_common(top))}",
    ]


def _describe_fggrn(shards: list[Path], top: int) -> list[str]:
    flags: Counter = Counter()
    attributes: Counter = Counter()
    examples: dict[str, str] = {}
    for shard in shards:
        for row_regions in pq.read_table(shard, columns=["regions"]).column("regions").to_pylist():
            for region in row_regions:
                flags[region["negatives_flag"]] += 1
                attributes.update(n["attribute"] for n in region["negatives"])
                if region["negatives"] and len(examples) < 3:
                    examples.setdefault(region["phrase"], region["negatives"][0]["text"])
    regions = sum(flags.values())
    return [
        f"  regions: {regions}, by flag: {', '.join(f'{flag} {count}' for flag, count in flags.most_common())}",
        f"  negatives: {sum(attributes.values())}, by attribute: {', '.join(f'{a} {c}' for a, c in attributes.most_common(top))}",
        f"  e.g. {'; '.join(f'{positive} -> {negative}' for positive, negative in examples.items())}",
    ]
