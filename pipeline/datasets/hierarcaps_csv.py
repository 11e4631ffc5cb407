"""The official HierarCaps CSV layouts, both ways.

As TAU-VAILab/hierarcaps ships and reads them (`code/train.py`, `evaluation/hierarchical_retrieval.py`):
train (`hierarcaps_train.csv.gz`): `positive,negative`, each a 4-tier chain split on " => ";
test (`hierarcaps_test.csv`): `id,captions,image_url`, the chain split on "=>" and stripped.
`negative` and `image_url` may be absent; extra columns are ignored. Files may be gzipped.
Curated chains are judged by structure only (4 tiers, none blank, no control characters), never
by the shape rule for model output (`chains.chain_shape_problem`): all 1,000 official test
and 23,479 expanded chains import whole.

Every data record of the file ends as a row or as a reject with a reason: a short row, a stray
quote, bytes that are not UTF-8, a NUL, an empty or repeated id cost that row only, never the file.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import logging
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.core.box_checks import shown
from pipeline.core.shards import list_shards
from pipeline.core.storage import Location, arrow_target, location
from pipeline.datasets.chains import SEPARATOR
from pipeline.datasets.datacard import DATACARD_FILE, export_datacard, write_text_atomic
from pipeline.errors import FgdataError

log = logging.getLogger(__name__)

LAYOUTS = {"train": ["positive", "negative"], "test": ["id", "captions", "image_url"]}
_REQUIRED = {"train": {"positive"}, "test": {"id", "captions"}}
# The reference splits train chains on " => " and test chains on "=>" (then strips).
_TIER_SEPARATORS = {"train": SEPARATOR, "test": "=>"}
TIERS = 4  # a HierarCaps chain: generic => ... => the caption
# The longest official field is under 600 characters; a field this long is a broken row, and the
# csv module's own limit (131,072) would otherwise refuse the whole file for it.
MAX_FIELD_CHARS = 10_000
MAX_KEY_CHARS = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NOT_UTF8 = re.compile(r"[\udc80-\udcff]")  # where surrogateescape put an undecodable byte
_LINE_BREAKS = re.compile(r"[\r\n]+")


def read_official_csv(path: Path) -> tuple[str, list[dict], list[dict]]:
    """(layout, rows, rejects) from an official CSV. Only a file without a usable header is an
    error; every data record becomes a row or a reject (key, reason, detail, source). `path` may
    be a URI (the file read through its store's filesystem)."""
    path = location(path)
    lines = io.StringIO(_read_text(path), newline="").readlines()  # splits at \n, \r\n and \r, as csv does
    previous_limit = csv.field_size_limit(2**31 - 1)  # long fields are rejected per row instead
    try:
        return _read_records(lines, path)
    finally:
        csv.field_size_limit(previous_limit)


def _read_records(lines: list[str], path: Path) -> tuple[str, list[dict], list[dict]]:
    _, start, header, _ = next(_records_from(lines, 0), (1, 0, [], None))
    header = [name.strip() for name in header or []]
    layout = next((name for name in LAYOUTS if _REQUIRED[name] <= set(header)), None)
    if layout is None:
        hint = " (is it UTF-8 text?)" if _NOT_UTF8.search("".join(header)) or "\x00" in "".join(header) else ""
        raise FgdataError(f"{path}: columns {header} match neither HierarCaps layout ({LAYOUTS}){hint}")
    columns = {name: header.index(name) for name in dict.fromkeys([*LAYOUTS[layout], "image_url"]) if name in header}
    rows, rejects, first_line_of, index = [], [], {}, 0
    while start is not None:
        records, start = _records_from(lines, start), None
        for line, _, fields, csv_error in records:
            if csv_error is not None:
                # A stray quote makes the csv module read on, across line ends, to the next quote,
                # swallowing the rows in between; read strictly, that ends in a quote it cannot
                # pair (or the end of the file). Only the first line is lost: reading starts
                # again at the next one. (Quoted line breaks are fine: the official files have them.)
                detail = f"a quote that does not close ({csv_error}); the line is left out, reading goes on at line {line + 1}"
                first_line_fields = next(csv.reader([lines[line - 1]]), [])  # for the id, when it has one
                row, reject, start = None, _reject(_key(layout, columns, first_line_fields, line, index)[0], "unbalanced_quote", detail, line, path), line
            else:
                row, reject = parse_record(layout, columns, len(header), fields, line, index, path)
            if row is not None and row["key"] in first_line_of:
                # decided here, on the driver, for the whole file: the first row keeps the id
                row, reject = None, _reject(row["key"], "duplicate_key", f"id {row['key']!r} is already used on line {first_line_of[row['key']]}", line, path)
            index += 1
            if row is not None:
                first_line_of[row["key"]] = line
                rows.append(row)
            else:
                rejects.append(reject)
            if start is not None:
                break
    return layout, rows, rejects


def _records_from(lines: list[str], start: int):
    """(first line, last line, fields, csv error) per CSV record from line index `start` on (lines
    are numbered from 1), blank lines left out; it stops after a record the csv module cannot read.
    strict: a quote that closes a field must be followed by a comma or the line end."""
    # a generator, not lines[start:]: a file of stray quotes restarts here at every line
    reader, done = csv.reader((lines[i] for i in range(start, len(lines))), strict=True), 0
    try:
        for fields in reader:
            first, done = start + done + 1, reader.line_num
            if fields and (len(fields) > 1 or fields[0].strip()):
                yield first, start + done, fields, None
    except csv.Error as exc:
        yield start + done + 1, start + reader.line_num, None, str(exc)


def parse_record(layout: str, columns: dict[str, int], width: int, fields: list[str], line: int, index: int, path: Path) -> tuple[dict | None, dict | None]:
    """One data record → (row, None) or (None, reject); `index` numbers the data records, for
    train-layout keys."""
    key, key_problem = _key(layout, columns, fields, line, index)
    if len(fields) != width:
        return None, _reject(key, "wrong_field_count", f"{len(fields)} fields, the header has {width}", line, path)
    if key_problem is not None:
        return None, _reject(key, *key_problem, line, path)
    # A line break inside a quoted caption is whitespace (one official test-expanded row has one);
    # any other control character is not text.
    used = {name: _one_line(fields[i].strip()) for name, i in columns.items()}
    if any(_NOT_UTF8.search(value) for value in used.values()):
        return None, _reject(key, "not_utf8", "bytes that are not UTF-8 text", line, path)
    if any(len(value) > MAX_FIELD_CHARS for value in used.values()):
        return None, _reject(key, "field_too_long", f"a field is over {MAX_FIELD_CHARS} characters", line, path)
    if any(_CONTROL.search(value) for value in used.values()):
        return None, _reject(key, "control_character", "a NUL or other control character inside a field", line, path)
    separator = _TIER_SEPARATORS[layout]
    tiers = [tier.strip() for tier in used["captions" if layout == "test" else "positive"].split(separator)]
    negative = used.get("negative") or None  # an item without negatives is still a chain
    negative_tiers = [tier.strip() for tier in negative.split(separator)] if negative else None
    for prefix, chain in (("", tiers), ("negative_", negative_tiers)):
        if chain is not None and len(chain) != TIERS:
            return None, _reject(key, f"wrong_{prefix}tier_count", f"{len(chain)} tiers split on {separator!r}, not {TIERS}", line, path)
        if chain is not None and not all(chain):
            return None, _reject(key, f"blank_{prefix}tier", f"tier {chain.index('') + 1} is empty", line, path)
    row = {
        "key": key,
        "split": layout,
        "tiers": tiers,
        "negative_tiers": negative_tiers,
        "image_url": used.get("image_url") or None,
        "source": str(path),
        "entailment": None,
    }
    return row, None


def _one_line(text: str) -> str:
    # split and strip, not one regex with \s* around the break: that backtracks over long runs of spaces
    return " ".join(part.strip() for part in _LINE_BREAKS.split(text)) if "\n" in text or "\r" in text else text


def _key(layout: str, columns: dict[str, int], fields: list[str], line: int, index: int) -> tuple[str, tuple[str, str] | None]:
    """The row's key, and why it is not usable (then the key names the line: row-<line>)."""
    if layout == "train":
        return f"train-{index:07d}", None  # the train layout has no id column
    position = columns["id"]
    raw = fields[position].strip() if position < len(fields) else ""
    if not raw:
        return f"row-{line}", ("missing_key", "the id is empty")
    if _NOT_UTF8.search(raw) or _CONTROL.search(raw) or len(raw) > MAX_KEY_CHARS:
        return f"row-{line}", ("bad_key", f"the id has control characters, bytes that are not UTF-8 or over {MAX_KEY_CHARS} characters")
    return raw, None


def _reject(key: str, reason: str, detail: str, line: int, path: Path) -> dict:
    return {"key": key, "reason": reason, "detail": f"line {line} of {path.name}: {detail}", "source": str(path)}


def _read_text(path: Path) -> str:
    """The file as text. Bytes that are not UTF-8 are kept as lone surrogates so that only their
    rows are rejected; a UTF-8 BOM (spreadsheets write one) is dropped; gzip is undone."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":  # the official train set ships as hierarcaps_train.csv.gz
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise FgdataError(f"{path}: cannot read the CSV ({exc})") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise FgdataError(f"{path}: is UTF-16 text; save it as UTF-8")
    return data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")


# the columns each layout writes from (and the train layout's filter on negative_tiers)
_EXPORT_COLUMNS = {"train": ["tiers", "negative_tiers"], "test": ["key", "tiers", "image_url"]}


def write_official_csv(dataset_dir: str | Location, out: str | Location, layout: str, overwrite: bool = False) -> dict:
    """Writes OUT whole or not at all (a temporary file renamed at the end; on a store, one upload);
    an existing OUT is the user's file and is replaced only with `overwrite`. The dataset and OUT
    may each be a local path or an `s3://`, `gs://`, `hf://` URI: shards are read one at a time,
    only the layout's columns, and the CSV is built in memory (at most ~100K chains)."""
    if layout not in LAYOUTS:
        raise FgdataError(f"layout must be train or test, got {layout!r}")
    out = location(out)
    if out.is_dir():
        raise FgdataError(f"{out} is a directory; give the path of the CSV file to write")
    card = out.with_name(f"{out.name}.{DATACARD_FILE}")  # the data card ships beside the CSV
    for path in (out, card):
        if path.exists() and not overwrite:
            raise FgdataError(f"{path} already exists; pass --overwrite to replace it, or choose another path")
    shards = list_shards(dataset_dir)
    written = skipped = 0
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(LAYOUTS[layout])
    for shard in shards:
        where, filesystem = arrow_target(shard)  # a local path, or the store's path and filesystem
        for row in pq.read_table(where, columns=_EXPORT_COLUMNS[layout], filesystem=filesystem).to_pylist():
            if layout == "train" and not row["negative_tiers"]:
                skipped += 1  # the train layout has no place for an item without negatives
                continue
            if layout == "train":
                writer.writerow([SEPARATOR.join(row["tiers"]), SEPARATOR.join(row["negative_tiers"])])
            else:
                writer.writerow([row["key"], SEPARATOR.join(row["tiers"]), row["image_url"] or ""])
            written += 1
    write_text_atomic(out, text.getvalue(), make_parents=True)
    note = f"Exported by `fgdata hierarcaps export` ({layout} layout) from {dataset_dir}: {written} rows in {out.name}, {skipped} left out without negatives."
    write_text_atomic(card, export_datacard(dataset_dir, note))
    return {"written": written, "skipped_without_negatives": skipped, "path": str(out), "datacard": str(card)}


def read_chains(
    sources: list[Path], need_negatives: bool = False, counts: Counter | None = None, first_of_each_key: bool = False
) -> list[tuple[str, list[str], list[str] | None]]:
    """(key, tiers, negative tiers or None) from hierarcaps shards or official CSVs, in a stable
    order; with `need_negatives`, chains without a negative chain are left out. Every chain left
    out is counted in `counts` as `skipped_<reason>` (the CSV reject reasons, `no_negative_chain`)
    so that callers record them (distill.json, the train manifest); nothing is dropped silently.
    A key in more than one source is an error, or with `first_of_each_key` (distill: seed and augment
    chain the same captions) the first source's chain is kept and the others counted."""
    counts = Counter() if counts is None else counts
    chains = []
    for source in map(location, sources):  # a Path, or a UPath for a URI
        if source.is_file():
            _, rows, rejects = read_official_csv(source)
            if rejects:
                reasons = Counter(reject["reason"] for reject in rejects)
                counts.update({f"skipped_{reason}": n for reason, n in reasons.items()})
                log.warning("%s: %d rows skipped (%s); `fgdata hierarcaps import` lists them", source, len(rejects), ", ".join(f"{n} {r}" for r, n in reasons.most_common()))
            chains += [(row["key"], row["tiers"], row["negative_tiers"]) for row in rows]
            continue
        for shard in list_shards(source):
            where, filesystem = arrow_target(shard)  # a local path, or the store's path and filesystem
            table = pq.read_table(where, filesystem=filesystem)
            if not {"key", "tiers", "negative_tiers"} <= set(table.column_names):
                raise FgdataError(f"{shard}: needs columns key, tiers and negative_tiers (a hierarcaps dataset)")
            chains += [(r["key"], r["tiers"], r["negative_tiers"]) for r in table.select(["key", "tiers", "negative_tiers"]).to_pylist()]
    if first_of_each_key:
        first = {}
        for chain in chains:
            first.setdefault(chain[0], chain)
        if len(first) < len(chains):
            counts["skipped_duplicate_key"] += len(chains) - len(first)
        chains = list(first.values())
    keys = [key for key, _, _ in chains]
    if len(keys) != len(set(keys)):
        raise FgdataError("the same key appears more than once across the inputs; give each chain once")
    if need_negatives:
        without = sum(negative is None for _, _, negative in chains)
        if without:
            counts["skipped_no_negative_chain"] += without
            log.warning("%d chains have no negative chain and are left out", without)
        chains = [chain for chain in chains if chain[2] is not None]
    if not chains:
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
        raise FgdataError(f"no usable chains in {', '.join(map(str, sources))}" + (f" ({skipped})" if skipped else ""))
    return chains


def chain_problem(tiers, negative_tiers=None, need_negatives: bool = False) -> tuple[str, str] | None:
    """Why a chain cannot be trained or evaluated on (None if it can): the Radial Embedding loss
    pairs tier i of a chain with tier i of its negative chain, batch by batch, and d_corr ranks
    the tiers, so every chain needs TIERS non-blank text tiers and, when negatives are used, a
    negative chain of the same shape."""
    checked = [("tiers", tiers)] + [("negative_tiers", negative_tiers)] * need_negatives
    for name, chain in checked:
        if not isinstance(chain, (list, tuple)):
            return f"{name}_missing", f"{name} is {shown(chain)}"
        if len(chain) != TIERS:
            return f"{name}_wrong_count", f"{name} has {len(chain)} tiers, need {TIERS}"
        if not all(isinstance(t, str) and t.strip() for t in chain):
            return f"{name}_blank", f"{name} {shown(chain)} has an empty or non-text tier"
    return None


def usable_chains(chains: list[tuple], need_negatives: bool, counts: Counter | None = None) -> list[tuple]:
    """The chains that pass `chain_problem`; the others are counted by reason in `counts`."""
    counts = Counter() if counts is None else counts
    kept = []
    for chain in chains:
        problem = chain_problem(chain[1], chain[2], need_negatives)
        if problem:
            counts[f"skipped_{problem[0]}"] += 1
        else:
            kept.append(chain)
    return kept
