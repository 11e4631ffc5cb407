"""`fgdata info`: what a dataset directory holds, in a few lines a person can read.

A damaged file (a part, a rejects file, the manifest) ends in a one-line error that names it,
never in a traceback.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from pipeline.core.schemas import check_input_columns, load_schema
from pipeline.core.shards import MANIFEST_FILE, REJECTS_DIR, incomplete_note, list_shards, read_json, read_shard, read_shard_schema
from pipeline.core.storage import location
from pipeline.core.terminal import printable
from pipeline.errors import FgdataError

_MANIFEST_KEYS = ("kind", "stage")  # the row counts are shown as "?" when absent (synthetic-world writes none)


def describe_dataset(dataset_dir: Path, top: int = 10) -> str:
    dataset_dir = location(dataset_dir)  # a local path or a URI
    manifest_path = dataset_dir / MANIFEST_FILE
    manifest = read_json(manifest_path)
    if manifest is None and dataset_dir.is_dir():  # a missing folder is list_shards' error
        raise FgdataError(incomplete_note(dataset_dir))
    shards = list_shards(dataset_dir)
    damaged = f"it is damaged: rerun the stage that wrote {dataset_dir} to rewrite it"
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise FgdataError(f"{manifest_path}: no {', '.join(map(repr, missing))}; {damaged}")
    kind, provenance = manifest["kind"], manifest.get("provenance") or {}
    if not isinstance(kind, str) or not isinstance(provenance, dict):
        raise FgdataError(f"{manifest_path}: 'kind' is not a name or 'provenance' not a mapping; {damaged}")
    provenance = {name: values if isinstance(values, list) else [values] for name, values in provenance.items()}
    # every value from the data (manifest, rejects, rows) goes through printable: it may hold
    # terminal escapes or line breaks, and this text is printed on a terminal
    lines = [
        f"{printable(dataset_dir)}  ({printable(kind)}, written by `fgdata {printable(manifest['stage'])}`)",
        f"  shards: {len(shards)}   rows in: {printable(manifest.get('rows_in', '?'))}   rows out: {printable(manifest.get('rows_out', '?'))}   "
        f"rejected: {printable(manifest.get('rows_rejected', '?'))}",
    ]
    rejects = _read_rejects(dataset_dir)
    if rejects:
        lines.append("  rejects by reason:")
        examples = {}
        for reject in rejects:
            examples.setdefault(reject["reason"], reject)
        for reason, count in Counter(r["reason"] for r in rejects).most_common():
            example = examples[reason]
            lines.append(f"    {printable(reason):<20} {count:>6}   e.g. {printable(example['key'])}: {printable((example['detail'] or '')[:90])}")
    for name, values in provenance.items():
        lines.append(f"  {printable(name)}: {', '.join(map(printable, values))}")
    if True in provenance.get("random_weights", []):
        lines.append("  NOTE: made by a RANDOM-WEIGHT model (offline demo/test): its output is noise")
    if kind in _DESCRIBERS:
        columns, describe_kind = _DESCRIBERS[kind]
        lines += describe_kind((_read_columns(shard, kind, columns) for shard in shards), top)
    return "\n".join(lines)


def _read_columns(path: Path, kind: str, columns: list[str]) -> pa.Table:
    """The columns `info` reads from one file, after checking them (nested fields too) against the
    schema of `kind`, so a wrong or damaged file is named rather than crashing halfway."""
    schema = load_schema(kind).arrow
    check_input_columns(read_shard_schema(path), {name: schema.field(name).type for name in columns}, where=str(path))
    return read_shard(path, columns=columns)


def _read_rejects(dataset_dir: Path) -> list[dict]:
    files = sorted((dataset_dir / REJECTS_DIR).glob("part-*.parquet"))
    return [row for f in files for row in _read_columns(f, "rejects", ["key", "reason", "detail"]).to_pylist()]


def _describe_images(tables: Iterable[pa.Table], top: int) -> list[str]:
    formats: Counter = Counter()
    captioned = total = 0
    for table in tables:
        formats.update(table.column("format").to_pylist())
        total += table.num_rows
        captioned += table.num_rows - table.column("short_caption").null_count
    return [
        f"  formats: {', '.join(f'{printable(name)} {count}' for name, count in formats.most_common())}",
        f"  with a caption: {captioned} of {total}",
    ]


def _describe_phrases(tables: Iterable[pa.Table], top: int) -> list[str]:
    phrases: Counter = Counter()
    heads: Counter = Counter()
    rows = 0
    for table in tables:
        for row_phrases in table.column("phrases").to_pylist():
            rows += 1
            for phrase in row_phrases:
                phrases[phrase["text"].lower()] += phrase["mentions"]
                heads[phrase["head"]] += phrase["mentions"]
    total = sum(phrases.values())
    return [
        f"  phrases: {total} ({total / max(rows, 1):.2f} per row), distinct: {len(phrases)}",
        f"  top phrases: {'; '.join(f'{printable(text)} ({count})' for text, count in phrases.most_common(top))}",
        f"  top head nouns: {', '.join(f'{printable(head)} ({count})' for head, count in heads.most_common(top))}",
    ]


def _describe_regions(tables: Iterable[pa.Table], top: int) -> list[str]:
    phrases: Counter = Counter()
    rows = empty = regions = 0
    for table in tables:
        for row_regions in table.column("regions").to_pylist():
            rows += 1
            empty += not row_regions
            regions += len(row_regions)
            phrases.update(region["phrase"].lower() for region in row_regions)
    return [
        f"  regions: {regions} ({regions / max(rows, 1):.2f} per image), images without a region: {empty}",
        f"  most grounded phrases: {'; '.join(f'{printable(text)} ({count})' for text, count in phrases.most_common(top))}",
    ]


def _describe_fggrn(tables: Iterable[pa.Table], top: int) -> list[str]:
    flags: Counter = Counter()
    attributes: Counter = Counter()
    examples: dict[str, str] = {}
    for table in tables:
        for row_regions in table.column("regions").to_pylist():
            for region in row_regions:
                flags[region["negatives_flag"]] += 1
                attributes.update(n["attribute"] for n in region["negatives"])
                if region["negatives"] and len(examples) < 3:
                    examples.setdefault(region["phrase"], region["negatives"][0]["text"])
    regions = sum(flags.values())
    return [
        f"  regions: {regions}, by flag: {', '.join(f'{printable(flag)} {count}' for flag, count in flags.most_common())}",
        f"  negatives: {sum(attributes.values())}, by attribute: {', '.join(f'{printable(a)} {c}' for a, c in attributes.most_common(top))}",
        f"  e.g. {'; '.join(f'{printable(positive)} -> {printable(negative)}' for positive, negative in examples.items())}",
    ]


# the columns each kind's summary reads, and the function that summarises them
_DESCRIBERS = {
    "images": (["format", "short_caption"], _describe_images),
    "phrases": (["phrases"], _describe_phrases),
    "regions": (["regions"], _describe_regions),
    "fggrn": (["regions"], _describe_fggrn),
}
