"""The official HierarCaps CSV layouts, both ways.

train: columns `positive,negative`, each a 4-tier chain joined by " => ".
test:  columns `id,captions,image_url`, `captions` the 4-tier chain.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import FgdataError
from pipeline.hierarchy import SEPARATOR, chain_shape_problem
from pipeline.shards import list_shards

log = logging.getLogger(__name__)

LAYOUTS = {"train": ["positive", "negative"], "test": ["id", "captions", "image_url"]}


def read_official_csv(path: Path) -> tuple[str, list[dict], list[dict]]:
    """(layout, rows, rejects) from an official CSV; a malformed chain becomes a reject."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FgdataError(f"{path}: cannot read the CSV ({exc})") from None
    layout = next((name for name, columns in LAYOUTS.items() if set(columns) <= set(header)), None)
    if layout is None:
        raise FgdataError(f"{path}: columns {header} match neither HierarCaps layout ({LAYOUTS})")
    rows, rejects = [], []
    for index, record in enumerate(records):
        key = record["id"] if layout == "test" else f"train-{index:07d}"
        positive = record["captions" if layout == "test" else "positive"].split(SEPARATOR)
        negative = record["negative"].split(SEPARATOR) if layout == "train" else None
        problem = chain_shape_problem([t.strip() for t in positive]) or (negative is not None and _negative_problem(negative))
        if problem:
            rejects.append({"key": key, "reason": problem, "detail": f"row {index + 2} of {path.name}", "source": str(path)})
            continue
        rows.append(
            {
                "key": key,
                "split": layout,
                "tiers": [t.strip() for t in positive],
                "negative_tiers": [t.strip() for t in negative] if negative else None,
                "image_url": record.get("image_url") or None,
                "source": str(path),
                "entailment": None,
            }
        )
    return layout, rows, rejects


def _negative_problem(negative: list[str]) -> str | None:
    return "wrong_negative_tier_count" if len(negative) != 4 or any(not t.strip() for t in negative) else None


def write_official_csv(dataset_dir: Path, out: Path, layout: str) -> dict:
    if layout not in LAYOUTS:
        raise FgdataError(f"layout must be train or test, got {layout!r}")
    written = skipped = 0
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(out.suffix + ".partial")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(LAYOUTS[layout])
        for shard in list_shards(dataset_dir):
            for row in pq.read_table(shard).to_pylist():
                if layout == "train" and not row["negative_tiers"]:
                    skipped += 1  # the train layout has no place for an item without negatives
                    continue
                if layout == "train":
                    writer.writerow([SEPARATOR.join(row["tiers"]), SEPARATOR.join(row["negative_tiers"])])
                else:
                    writer.writerow([row["key"], SEPARATOR.join(row["tiers"]), row["image_url"] or ""])
                written += 1
    partial.replace(out)
    return {"written": written, "skipped_without_negatives": skipped, "path": str(out)}


def read_chains(sources: list[Path], need_negatives: bool = False) -> list[tuple[str, list[str], list[str] | None]]:
    """(key, tiers, negative tiers or None) from hierarcaps shards or official CSVs, in a stable
    order; with `need_negatives`, chains without a negative chain are left out (and counted)."""
    chains = []
    for source in map(Path, sources):
        if source.is_file():
            _, rows, rejects = read_official_csv(source)
            if rejects:
                log.warning("%s: %d malformed rows skipped (see `fgdata hierarcaps import`)", source, len(rejects))
            chains += [(row["key"], row["tiers"], row["negative_tiers"]) for row in rows]
            continue
        for shard in list_shards(source):
            table = pq.read_table(shard)
            if not {"key", "tiers", "negative_tiers"} <= set(table.column_names):
                raise FgdataError(f"{shard}: needs columns key, tiers and negative_tiers (a hierarcaps dataset)")
            chains += [(r["key"], r["tiers"], r["negative_tiers"]) for r in table.select(["key", "tiers", "negative_tiers"]).to_pylist()]
    keys = [key for key, _, _ in chains]
    if len(keys) != len(set(keys)):
        raise FgdataError("the same key appears more than once across the inputs; give each chain once")
    if need_negatives:
        without = sum(negative is None for _, _, negative in chains)
        if without:
            log.warning("%d chains have no negative chain and are left out", without)
        chains = [chain for chain in chains if chain[2] is not None]
    if not chains:
        raise FgdataError(f"no usable chains in {', '.join(map(str, sources))}")
    return chains
