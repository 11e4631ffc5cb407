"""`fgdata report DATASET --out report.html`: one self-contained page to look at a dataset.

The funnel across the dataset's lineage (rows in, out and rejected per step), rejects by reason
with examples (thumbnail and detail), images with their boxes drawn and labelled, each region's
negatives with attribute kind and NLI scores, histograms as inline SVG, and for HierarCaps the
chains with their negatives per tier. A random-weight lineage gets a banner.

- Self-contained: images are inline data URIs; a Content-Security-Policy forbids every network
  fetch and every script but the page's own (by hash), so even a missed escape could not run one.
- Every text from the data goes through html.escape: captions are hostile input.
- Large datasets are sampled early: whole row groups are chosen at random from the shards'
  metadata and only the columns the page shows are read, so 1M rows render in seconds. Funnel and
  reject counts stay exact (they come from manifests and the reason column).
- The dataset and its lineage may be local paths or `s3://`, `gs://`, `hf://` URIs (core/storage):
  on a store the same footers, row groups, columns and image batches are read, by range requests.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
import os
import random
import time
import warnings
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.core.schemas import check_input_columns, load_schema
from pipeline.core.shards import MANIFEST_FILE, REJECTS_DIR, list_shards, open_shard, read_json, shard_path, shard_rows
from pipeline.core.sources import IMAGE_SUFFIXES
from pipeline.core.storage import Location, is_uri, location
from pipeline.datasets.datacard import model_notes, random_weight_steps, walk_lineage, write_text_atomic
from pipeline.errors import FgdataError

# A text longer than this is cut on the page, with its full length beside it: Chromium's layout time
# grows with a text's length, with its square for one cluster of combining marks as Zalgo alt-text
# has (a page of 30 cards with fifteen 40k-char tokens took 45 s to load, the same page cut 2 s).
SHOWN_CHARS = 2000
BOX_COLOUR = "#ff00ff"  # one colour no sample image uses, so a screenshot test can find the boxes
THUMB_SIDE = 320
# the columns each kind's page reads: required ones are checked against the schema, optional ones
# (added by newer stages) are read when the file has them
# what `fgdata quality` and ground's detector agreement add to region and FgGRN rows, where a shard has them
_SCORE_COLUMNS = ["short_caption_score", "long_caption_score", "region_clip_scores", "region_agreement_ious", "quality_model_is_random"]
_COLUMNS = {
    "images": (["key", "width", "height", "format", "short_caption"], []),
    "captions": (["key", "short_caption", "long_caption"], ["caption_model_is_random", "generated_tokens"]),
    "phrases": (["key", "short_caption", "long_caption", "phrases"], []),
    "regions": (["key", "short_caption", "long_caption", "width", "height", "regions"], ["detector_is_random", *_SCORE_COLUMNS]),
    "fggrn": (["key", "short_caption", "long_caption", "width", "height", "regions"], ["detector_is_random", "nli_is_random", *_SCORE_COLUMNS]),
    "hierarcaps": (["key", "tiers", "negative_tiers"], ["entailment", "negative_nli", "model_is_random"]),
}
_RANDOM_COLUMNS = ("detector_is_random", "nli_is_random", "caption_model_is_random", "model_is_random", "quality_model_is_random")

# Records every script error, failed resource, console.error and blocked fetch into the DOM, so a
# headless browser's --dump-dom shows whether the page rendered cleanly.
_SCRIPT = """(function () {
  var root = document.documentElement, errors = [];
  function note(message) {
    errors.push(String(message));
    root.setAttribute('data-errors', String(errors.length));
    var box = document.getElementById('page-errors');
    if (box) { box.textContent = errors.join('\\n'); box.hidden = false; }
  }
  window.addEventListener('error', function (e) { note(e.message || ('failed to load ' + (e.target && e.target.tagName))); }, true);
  window.addEventListener('unhandledrejection', function (e) { note('unhandled rejection: ' + e.reason); });
  document.addEventListener('securitypolicyviolation', function (e) { note('blocked by policy: ' + e.violatedDirective + ' ' + e.blockedURI); });
  var original = console.error;
  console.error = function () { note(Array.prototype.join.call(arguments, ' ')); return original.apply(console, arguments); };
  window.addEventListener('load', function () { root.setAttribute('data-report-ready', '1'); });
})();"""
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
_CSP = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{_SCRIPT_HASH}'"

BANNER_STYLE = ".banner { background: #b00020; color: #fff; padding: .8em 1em; font-weight: bold; }"
_STYLE = BANNER_STYLE + """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; } .errors { background: #fee; color: #900; white-space: pre-wrap; }
.gallery { display: flex; flex-wrap: wrap; gap: 1.2em; }
.card { width: 380px; border: 1px solid #ddd; padding: .5em; overflow-wrap: anywhere; }
.card svg { display: block; background: #333; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5em; }
.thumb { width: 96px; height: auto; }
.chain td { min-width: 8em; }
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def page_text(value) -> str:
    """A text from the data for the page's HTML: escaped, and cut to SHOWN_CHARS with "…" and its length."""
    text = "" if value is None else str(value)
    if len(text) <= SHOWN_CHARS:
        return esc(text)
    return f"{esc(text[:SHOWN_CHARS])}… <span class='note'>({len(text):,} chars)</span>"


def _fmt(value, digits: int = 2) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else esc(value)
    return esc(value)


# --- reading ---------------------------------------------------------------------------------


def _columns_to_read(shard: Location, kind: str, file_schema: pa.Schema) -> list[str]:
    required, optional = _COLUMNS[kind]
    schema = load_schema(kind).arrow
    check_input_columns(file_schema, {name: schema.field(name).type for name in required}, where=str(shard))
    return required + [name for name in optional if name in file_schema.names and file_schema.field(name).type == schema.field(name).type]


def sample_rows(shards: list[Location], kind: str, limit: int, seed: int) -> tuple[list[dict], dict]:
    """Rows from whole row groups chosen at random until `limit` rows, reading only the page's
    columns; a group over the limit is cut at random. Returns (rows, what was sampled)."""
    groups, total, footers = [], 0, {}
    for shard in shards:
        try:
            # kept: reading a chosen group reuses it, so each footer is fetched once (a request on a store)
            metadata = footers[shard] = open_shard(shard).metadata
        except (pa.ArrowException, OSError) as exc:
            raise FgdataError(f"{shard}: not a readable Parquet file ({exc})") from None
        for index in range(metadata.num_row_groups):
            groups.append((shard, index, metadata.row_group(index).num_rows))
        total += metadata.num_rows
    rng = random.Random(seed)
    order = groups if total <= limit else rng.sample(groups, len(groups))
    rows: list[dict] = []
    chosen = 0
    for shard, index, _ in order:
        if len(rows) >= limit:
            break
        columns = _columns_to_read(shard, kind, footers[shard].schema.to_arrow_schema())
        try:
            table = open_shard(shard, footers[shard]).read_row_group(index, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise FgdataError(f"{shard}: cannot read shard ({exc})") from None
        if table.num_rows > limit - len(rows):
            table = table.take(sorted(rng.sample(range(table.num_rows), limit - len(rows))))
        table = table.append_column("_shard", pa.array([shard.name] * table.num_rows, pa.string()))
        rows += table.to_pylist()
        chosen += 1
    return rows, {"total": total, "sampled": len(rows), "groups": len(groups), "groups_read": chosen, "seed": seed}


def _thumbnails(images_dir: Location | None, wanted: dict[str, set[str]]) -> dict[tuple[str, str], tuple[str, int, int]]:
    """(shard, key) -> (data URI of a thumbnail, width, height) for the wanted keys of each shard,
    read from the images ancestor's shard of the same name with a key filter."""
    found: dict = {}
    if images_dir is None:
        return found
    for shard_name, keys in wanted.items():
        path = shard_path(images_dir, shard_name)
        if not keys or not path.is_file():
            continue
        left = set(keys)
        try:
            # in batches, stopping once every wanted key is found: an image shard can hold gigabytes
            for batch in open_shard(path).iter_batches(batch_size=256, columns=["key", "image"]):
                batch_keys = batch.column(0).to_pylist()
                for index in (i for i, key in enumerate(batch_keys) if key in left):
                    left.discard(batch_keys[index])
                    uri = _thumbnail_uri(batch.column(1)[index].as_py())
                    if uri:
                        found[(shard_name, batch_keys[index])] = uri
                if not left:
                    break
        except (pa.ArrowException, OSError, ValueError):
            continue  # no thumbnails from a damaged image shard; the page says "no image"
    return found


def _pick_gallery(rows: list[dict], count: int, seed: int) -> list[dict]:
    """`count` rows at random, taken from as few shards as possible (shards in random order), so
    the thumbnails need few image shards read."""
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(row["_shard"], []).append(row)
    rng = random.Random(seed)
    picked: list[dict] = []
    for shard in rng.sample(sorted(by_shard), len(by_shard)):
        if len(picked) >= count:
            break
        group = by_shard[shard]
        picked += rng.sample(group, min(count - len(picked), len(group)))
    return picked


def _thumbnail_uri(data: bytes | None) -> tuple[str, int, int] | None:
    """A small JPEG of the image as a data URI, with the stored image's size; None when it does not decode."""
    if not data:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            size = image.size
            image.draft("RGB", (THUMB_SIDE, THUMB_SIDE))  # JPEG decodes straight at a smaller scale
            image = image.convert("RGB")
            image.thumbnail((THUMB_SIDE, THUMB_SIDE))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - an undecodable image is shown as "no image", never a crash
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(), size[0], size[1]


def _reject_summary(dataset_dir: Location) -> tuple[Counter, list[Location]]:
    files = sorted((location(dataset_dir) / REJECTS_DIR).glob("part-*.parquet"))
    counts: Counter = Counter()
    for path in files:
        try:
            column = open_shard(path).read(columns=["reason"]).column("reason")
        except (pa.ArrowException, OSError) as exc:
            raise FgdataError(f"{path}: cannot read rejects ({exc})") from None
        for item in pc.value_counts(column).to_pylist():
            counts[item["values"]] += item["counts"]
    return counts, files


def _reject_examples(files: list[Location], reasons: Counter, per_reason: int) -> dict[str, list[dict]]:
    """The first few rejects of each reason, reading files in order until every reason has enough."""
    examples: dict[str, list[dict]] = {reason: [] for reason in reasons}
    for path in files:
        if all(len(v) >= per_reason for v in examples.values()):
            break
        table = open_shard(path).read(columns=["key", "reason", "detail"])
        for row in table.to_pylist():
            bucket = examples.setdefault(row["reason"], [])
            if len(bucket) < per_reason:
                bucket.append({**row, "_shard": path.name})
    return examples


# --- drawing ---------------------------------------------------------------------------------


def _finite_box(box, width: float, height: float) -> list[float] | None:
    """The box clipped to the image, or None when it is not four finite numbers with area."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        return None
    x1, y1, x2, y2 = (min(max(float(v), 0.0), limit) for v, limit in zip(box, (width, height, width, height)))
    return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None


def boxes_svg(thumb: tuple[str, int, int] | None, width: int, height: int, regions: list[dict]) -> str:
    """The image with each region's box and its number, in the image's pixel coordinates; the
    phrases and scores are listed under the picture by number (`_gallery`), as labels drawn on
    overlapping boxes would cover each other. Boxes that are not drawable are counted below."""
    width = width if isinstance(width, int) and width > 0 else (thumb[1] if thumb else 100)
    height = height if isinstance(height, int) and height > 0 else (thumb[2] if thumb else 100)
    scale = max(width, height) / THUMB_SIDE
    shown_w, shown_h = (THUMB_SIDE, round(THUMB_SIDE * height / width)) if width >= height else (round(THUMB_SIDE * width / height), THUMB_SIDE)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{shown_w}" height="{shown_h}" role="img">']
    if thumb:
        parts.append(f'<image href="{thumb[0]}" x="0" y="0" width="{width}" height="{height}" preserveAspectRatio="none"/>')
    else:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" fill="#bbb" font-size="{12 * scale}" text-anchor="middle">no image</text>')
    undrawable, badges = 0, []
    for number, region in enumerate(regions, 1):
        box = _finite_box(region.get("box"), width, height)
        if box is None:
            undrawable += 1
            continue
        x1, y1, x2, y2 = box
        parts.append(
            f'<rect class="box" x="{x1:.1f}" y="{y1:.1f}" width="{x2 - x1:.1f}" height="{y2 - y1:.1f}" fill="none" '
            f'stroke="{BOX_COLOUR}" stroke-width="3" vector-effect="non-scaling-stroke"/>'
        )
        x, y, w, h = _badge_place(x1, y1, (7 * len(str(number)) + 6) * scale, 14 * scale, badges, width, height)
        parts.append(
            f'<g class="badge"><rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="#000" fill-opacity="0.75"/>'
            f'<text x="{x + w / 2:.1f}" y="{y + 11 * scale:.1f}" font-size="{11 * scale:.1f}" fill="#fff" text-anchor="middle">{number}</text></g>'
        )
    parts.append("</svg>")
    if undrawable:
        parts.append(f'<div class="note">{undrawable} box(es) not drawable (not four finite numbers inside the image)</div>')
    return "".join(parts)


def _badge_place(x: float, y: float, w: float, h: float, placed: list, width: float, height: float) -> tuple[float, float, float, float]:
    """A box's number badge at its top-left corner, moved down (then right) past the badges already
    placed, so boxes that share a corner keep readable numbers; appended to `placed`. Past 64 badges
    (no picture is readable with that many boxes) each stays at its corner: a row of thousands of
    boxes (hostile data) costs linear time, not quadratic."""
    x, y = min(x, max(width - w, 0)), min(y, max(height - h, 0))
    while len(placed) < 64 and any(x < px + pw and px < x + w and y < py + ph and py < y + h for px, py, pw, ph in placed):
        y += h
        if y + h > height:
            x, y = x + w, 0.0
    placed.append((x, y, w, h))
    return x, y, w, h


def _histogram(title: str, values: list[float], bins: int = 20, log_note: str = "") -> str:
    numbers = np.array([v for v in values if isinstance(v, (int, float)) and math.isfinite(v)], dtype=float)
    dropped = len(values) - len(numbers)
    if not len(numbers):
        return f"<figure><figcaption>{esc(title)}</figcaption><div class='note'>no values</div></figure>"
    note = f"n={len(numbers)}" + (f", {dropped} not finite" if dropped else "") + (f", {log_note}" if log_note else "")
    low, high = float(numbers.min()), float(numbers.max())
    if low == high:  # one bar: numpy cannot cut an empty range, and past 2**53 low + 0.5 is low itself
        return _bars(title, [f"{low:.3g}"], [len(numbers)], note, ticks=[(0.5, f"{low:.3g}")])
    if np.all(numbers == np.round(numbers)) and high - low <= 40 and max(-low, high) < 2**52:
        # a few integers (boxes per image, words): a bar per value, ticks under the bars
        counts, edges = np.histogram(numbers, bins=np.arange(low - 0.5, high + 1))
        labels = [f"{(a + b) / 2:.0f}" for a, b in zip(edges[:-1], edges[1:])]
        ticks = [((i + 0.5) / len(labels), labels[i]) for i in _spread(len(labels))]
    else:
        # halves first, as high - low overflows past 1e308; the ends exact, so every value has a bin
        edges = np.linspace(low / 2, high / 2, bins + 1) * 2
        edges[0], edges[-1] = low, high
        counts, edges = np.histogram(numbers, bins=edges)
        labels = [f"{a:.3g}–{b:.3g}" for a, b in zip(edges[:-1], edges[1:])]
        ticks = [(i / bins, f"{edges[i]:.3g}") for i in _spread(bins + 1)]
    return _bars(title, labels, [int(c) for c in counts], note, ticks=ticks)


def _spread(count: int, ticks: int = 5) -> list[int]:
    """Up to `ticks` indices from 0 to count - 1, evenly apart, both ends included."""
    return sorted({round(i * (count - 1) / (ticks - 1)) for i in range(ticks)})


def _categories(title: str, counts: Counter, top: int = 15) -> str:
    items = counts.most_common(top)
    if not items:
        return f"<figure><figcaption>{esc(title)}</figcaption><div class='note'>no values</div></figure>"
    rest = sum(counts.values()) - sum(c for _, c in items)
    return _bars(title, [str(k) for k, _ in items], [c for _, c in items], f"n={sum(counts.values())}" + (f", {rest} in other kinds" if rest else ""), vertical_labels=True)


def _bars(title: str, labels: list[str], counts: list[int], note: str, ticks: list[tuple[float, str]] = (), vertical_labels: bool = False) -> str:
    """Bars with an axis: `ticks` are (where along it, 0 to 1; label)."""
    width, height, pad = 300, 150, 20
    bar = (width - 2 * pad) / max(len(counts), 1)
    peak = max(counts) or 1
    parts = [f'<figure><figcaption>{esc(title)} <span class="note">({esc(note)})</span></figcaption>',
             f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + (90 if vertical_labels else 20)}">']
    for i, (label, count) in enumerate(zip(labels, counts)):
        h = (height - pad) * count / peak
        x = pad + i * bar
        parts.append(f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{max(bar - 1, 1):.1f}" height="{h:.1f}" fill="#4a7ab5"><title>{esc(label[:SHOWN_CHARS])}: {count}</title></rect>')
        if vertical_labels:
            parts.append(f'<text transform="translate({x + bar / 2 + 3:.1f},{height + 4}) rotate(60)" font-size="10">{esc(label[:24])}</text>')
    parts.append(f'<text x="{pad}" y="12" font-size="10">max {peak}</text>')
    for where, label in ticks:
        x = pad + where * (width - 2 * pad)
        parts.append(f'<line x1="{x:.1f}" y1="{height}" x2="{x:.1f}" y2="{height + 4}" stroke="#555"/>'
                     f'<text class="tick" x="{x:.1f}" y="{height + 14}" font-size="10" text-anchor="middle">{esc(label)}</text>')
    parts.append("</svg></figure>")
    return "".join(parts)


# --- sections ----------------------------------------------------------------------------------


def _rows_of(step: dict, name: str):
    value = (step["manifest"] or {}).get(name)
    return value if isinstance(value, int) else None


def _source_images(step: dict) -> int | None:
    """The image files in a source folder of the lineage (what ingest lists as its rows in), or None
    for any other source: a table, tars, a folder on a store, a dataset whose manifest is gone."""
    path = step["path"]
    if step["manifest"] is not None or step["stage"] or is_uri(path) or not os.path.isdir(path):
        return None
    return sum(1 for _, _, files in os.walk(path) for name in files if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES)


def _funnel(steps: list[dict]) -> str:
    out = ["<table><tr><th>step</th><th>kind</th><th>dataset</th><th>rows in</th><th>rows out</th><th>rejected</th><th>drop rate</th><th>rejects by reason</th></tr>"]
    for step in steps:
        rows_in, rows_out, rejected = _rows_of(step, "rows_in"), _rows_of(step, "rows_out"), _rows_of(step, "rows_rejected")
        # a step with a manifest was read, so its location parses (a local path or a URI)
        place = location(step["path"]) if step["manifest"] is not None else None
        here = place is not None and place.is_dir()
        if rows_out is None and here:
            rows_out = sum(shard_rows(p) for p in list_shards(place))
        drop = f"{rejected / rows_in:.1%}" if rows_in and rejected is not None else "–"
        images = _source_images(step)
        if images is not None:  # a folder has files, not rows: what it holds, and nothing to reject
            rows_in, rows_out, rejected = "–", f"{images:,} image files", "–"
        reasons = ""
        if here:
            counts, _ = _reject_summary(place)
            reasons = ", ".join(f"{page_text(r)} {c}" for r, c in counts.most_common())
        stage = str(step["stage"] or "source")
        if step["error"]:
            stage += f" (unreadable manifest: {step['error']})"
        out.append(
            f"<tr><td>{page_text(stage)}</td><td>{page_text(step['kind'] or step['format'] or '')}</td><td>{page_text(step['path'])}</td>"
            f"<td class='num'>{esc(rows_in if rows_in is not None else '?')}</td><td class='num'>{esc(rows_out if rows_out is not None else '?')}</td>"
            f"<td class='num'>{esc(rejected if rejected is not None else '?')}</td><td class='num'>{drop}</td><td>{reasons}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _rejects_section(dataset_dir: Location, images_dir: Location | None, per_reason: int) -> str:
    counts, files = _reject_summary(dataset_dir)
    if not counts:
        return "<p>No rejects in this dataset.</p>"
    examples = _reject_examples(files, counts, per_reason)
    wanted: dict[str, set] = {}
    for rows in examples.values():
        for row in rows:
            wanted.setdefault(row["_shard"], set()).add(row["key"])
    thumbs = _thumbnails(images_dir, wanted)
    out = ["<table><tr><th>reason</th><th>count</th><th>examples</th></tr>"]
    for reason, count in counts.most_common():
        cells = []
        for row in examples.get(reason, []):
            thumb = thumbs.get((row["_shard"], row["key"]))
            image = f'<img class="thumb" alt="" src="{thumb[0]}"> ' if thumb else ""
            cells.append(f"<div>{image}<b>{page_text(row['key'])}</b>: {page_text(row['detail'])}</div>")
        out.append(f"<tr><td>{page_text(reason)}</td><td class='num'>{count}</td><td>{''.join(cells)}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _negatives_table(region: dict) -> str:
    negatives = region.get("negatives") or []
    if not negatives:
        return f"<div class='note'>no negatives ({page_text(region.get('negatives_flag', ''))})</div>"
    out = ["<table><tr><th>negative</th><th>attribute</th><th>ent</th><th>con</th><th>neu</th></tr>"]
    for n in negatives:
        out.append(
            f"<tr><td>{page_text(n.get('text'))}</td><td>{page_text(n.get('attribute'))}</td><td class='num'>{_fmt(n.get('entailment'))}</td>"
            f"<td class='num'>{_fmt(n.get('contradiction'))}</td><td class='num'>{_fmt(n.get('neutral'))}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _gallery(kind: str, rows: list[dict], thumbs: dict) -> str:
    cards = []
    for row in rows:
        thumb = thumbs.get((row["_shard"], row["key"]))
        parts = [f"<div class='card'><div><b>{page_text(row['key'])}</b></div>"]
        if kind in ("regions", "fggrn"):
            regions = row.get("regions") or []
            parts.append(boxes_svg(thumb, row.get("width"), row.get("height"), regions))
            for number, region in enumerate(regions, 1):
                parts.append(f"<div><b>{number}. {page_text(region.get('phrase'))}</b> <span class='note'>score {_fmt(region.get('score'))}</span></div>")
                if kind == "fggrn":
                    parts.append(_negatives_table(region))
        elif thumb:
            parts.append(f'<img alt="" src="{thumb[0]}" style="max-width:320px">')
        parts.append(f"<div><span class='note'>short:</span> {page_text(row.get('short_caption'))}</div>")
        if row.get("long_caption"):
            parts.append(f"<div><span class='note'>long:</span> {page_text(row['long_caption'])}</div>")
        if kind == "phrases":
            parts.append("<div><span class='note'>phrases:</span> " + "; ".join(page_text(p.get("text")) for p in row.get("phrases") or []) + "</div>")
        parts.append("</div>")
        cards.append("".join(parts))
    return "<div class='gallery'>" + "".join(cards) + "</div>"


def _chains(rows: list[dict]) -> str:
    out = []
    for row in rows:
        tiers, negatives = row.get("tiers") or [], row.get("negative_tiers") or []
        scores, nli = row.get("entailment") or [], row.get("negative_nli") or []
        cells = ["<table class='chain'><tr><th>" + page_text(row["key"]) + "</th>" + "".join(f"<th>tier {i + 1}</th>" for i in range(len(tiers))) + "</tr>"]
        cells.append("<tr><td>positive</td>" + "".join(f"<td>{page_text(t)}</td>" for t in tiers) + "</tr>")
        if scores:
            cells.append("<tr><td class='note'>P(entailed by next)</td>" + "".join(f"<td class='num'>{_fmt(s)}</td>" for s in scores) + "</tr>")
        cells.append("<tr><td>negative</td>" + ("".join(f"<td>{page_text(t)}</td>" for t in negatives) if negatives else f"<td colspan='{max(len(tiers), 1)}' class='note'>none</td>") + "</tr>")
        if nli:
            cells.append("<tr><td class='note'>negative NLI (con / ent / parent ent)</td>" + "".join(
                f"<td class='num'>{_fmt(s.get('contradiction'))} / {_fmt(s.get('entailment'))} / {_fmt(s.get('parent_entailment'))}</td>" if isinstance(s, dict) else "<td></td>" for s in nli) + "</tr>")
        cells.append("</table>")
        out.append("".join(cells))
    return "".join(out)


def _words(text) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def _charts(kind: str, rows: list[dict]) -> str:
    charts = []
    if kind in ("regions", "fggrn"):
        regions = [r for row in rows for r in row.get("regions") or []]
        charts.append(_histogram("boxes per image", [len(row.get("regions") or []) for row in rows]))
        areas = []
        for region in regions:
            box = region.get("box_norm")
            if isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
                areas.append((box[2] - box[0]) * (box[3] - box[1]))
        charts.append(_histogram("box area (fraction of the image)", areas))
        charts.append(_histogram("box score", [r.get("score") for r in regions]))
        # only where the dataset has them: a chart of nothing but "no values" would say nothing
        for title, values in (
            ("image-short caption CLIP score", [row.get("short_caption_score") for row in rows if row.get("short_caption_score") is not None]),
            ("image-long caption CLIP score", [row.get("long_caption_score") for row in rows if row.get("long_caption_score") is not None]),
            ("region-phrase CLIP score", [s for row in rows for s in row.get("region_clip_scores") or [] if s is not None]),
            ("box agreement IoU (the other detector's best)", [s for row in rows for s in row.get("region_agreement_ious") or [] if s is not None]),
        ):
            if values:
                charts.append(_histogram(title, values))
        if kind == "fggrn":
            charts.append(_histogram("negatives per region", [len(r.get("negatives") or []) for r in regions]))
            charts.append(_categories("attribute kinds", Counter(n.get("attribute") for r in regions for n in r.get("negatives") or [])))
            charts.append(_categories("region flags", Counter(r.get("negatives_flag") for r in regions)))
    if kind == "phrases":
        charts.append(_histogram("phrases per caption", [len(row.get("phrases") or []) for row in rows]))
    if kind == "images":
        charts.append(_histogram("image width", [row.get("width") for row in rows]))
        charts.append(_categories("formats", Counter(row.get("format") for row in rows)))
    if kind == "captions" and any("generated_tokens" in row for row in rows):
        charts.append(_histogram("generated tokens", [row.get("generated_tokens") for row in rows]))
    if kind == "hierarcaps":
        for tier in range(4):
            charts.append(_histogram(f"words in tier {tier + 1}", [_words(row["tiers"][tier]) for row in rows if len(row.get("tiers") or []) > tier]))
        charts.append(_histogram("P(entailment) between tiers", [s for row in rows for s in row.get("entailment") or []]))
        charts.append(_categories("has a negative chain", Counter("yes" if row.get("negative_tiers") else "no" for row in rows)))
    else:
        charts.append(_histogram("short caption length (words)", [_words(row.get("short_caption")) for row in rows]))
        if any(row.get("long_caption") for row in rows):
            charts.append(_histogram("long caption length (words)", [_words(row.get("long_caption")) for row in rows if row.get("long_caption")]))
    return "<div class='charts'>" + "".join(charts) + "</div>"


# --- the page ----------------------------------------------------------------------------------


def random_weights_banner(steps: list[dict], rows: list[dict] = ()) -> str:
    """The red RANDOM WEIGHTS banner (BANNER_STYLE) when a step of the lineage or a row says a
    random-weight model made it, else "": the report and the audit page show the same one."""
    randoms = random_weight_steps(steps)
    random_rows = Counter(name for row in rows for name in _RANDOM_COLUMNS if row.get(name) is True)
    if not randoms and not random_rows:
        return ""
    what = [f"step {s}" for s in randoms] + [f"{count} sampled rows with {name}" for name, count in random_rows.items()]
    return f"<div class='banner' id='random-banner'>RANDOM WEIGHTS: {page_text('; '.join(what))}. This output is noise (an offline demo or test): do not train on it.</div>"


def render_report(dataset_dir: str | Location, sample: int = 20_000, gallery: int = 24, examples: int = 3, seed: int = 0) -> tuple[str, dict]:
    """(the page, a summary: rows, sampled, seconds)."""
    started = time.perf_counter()
    dataset_dir = location(dataset_dir)  # a Path, or a UPath for an s3://, gs://, hf:// URI
    manifest = read_json(dataset_dir / MANIFEST_FILE)
    if manifest is None:
        raise FgdataError(f"{dataset_dir} has no {MANIFEST_FILE}: it is not a finished fgdata dataset; rerun the stage that writes it")
    kind = manifest.get("kind")
    if not isinstance(kind, str) or kind not in _COLUMNS:
        raise FgdataError(f"{dataset_dir / MANIFEST_FILE}: kind {kind!r} has no report (known: {', '.join(_COLUMNS)})")
    shards = list_shards(dataset_dir)
    steps = walk_lineage(dataset_dir, manifest)
    rows, sampled = sample_rows(shards, kind, max(sample, gallery), seed)
    # the nearest images dataset upstream; walk_lineage, unlike a plain recursion, survives a loop
    images_dir = next((location(s["path"]) for s in sorted(steps, key=lambda s: s["depth"]) if s["kind"] == "images" and location(s["path"]).is_dir()), None)
    shown = _pick_gallery(rows, gallery, seed)
    wanted: dict[str, set] = {}
    for row in shown:
        wanted.setdefault(row["_shard"], set()).add(row["key"])
    thumbs = _thumbnails(images_dir, wanted) if kind != "hierarcaps" else {}
    shards_shown = len(wanted)

    banner = random_weights_banner(steps, rows) + "".join(f"<p class='note model-note'>DEMO MODEL: {page_text(note)}</p>" for note in model_notes(steps))

    if sampled["sampled"] < sampled["total"]:
        sample_note = (f"Sampled: histograms and examples come from {sampled['sampled']:,} of {sampled['total']:,} rows "
                       f"({sampled['groups_read']} of {sampled['groups']} row groups chosen at random, seed {seed}); the funnel and reject counts are exact.")
    else:
        sample_note = f"All {sampled['total']:,} rows are read (no sampling)."
    body = [
        f"<h1>fgdata report: {esc(dataset_dir.name)}</h1>",
        banner,
        f"<p>{esc(kind)} dataset written by <code>fgdata {page_text(manifest.get('stage'))}</code> on {page_text(manifest.get('created_at', 'an unknown date'))}; "
        f"path <code>{esc(dataset_dir)}</code>.</p>",
        f"<p class='note' id='sample-note'>{esc(sample_note)}</p>",
        "<pre class='errors' id='page-errors' hidden></pre>",
        "<h2>Funnel</h2>", _funnel(steps),
        "<h2>Rejects by reason</h2>", _rejects_section(dataset_dir, images_dir, examples),
        "<h2>Histograms</h2>", _charts(kind, rows),
    ]
    if kind == "hierarcaps":
        body += [f"<h2>Chains ({len(shown)} at random from {shards_shown} shard(s))</h2>", _chains(shown)]
    else:
        title = "Images with their boxes" if kind in ("regions", "fggrn") else "Examples"
        body += [f"<h2>{title} ({len(shown)} at random from {shards_shown} shard(s))</h2>",
                 "" if images_dir else "<p class='note'>No images dataset in the lineage: boxes are drawn on a blank canvas.</p>",
                 _gallery(kind, shown, thumbs)]
    page = (
        "<!DOCTYPE html>\n<html lang='en' data-errors='0'><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>fgdata report: {esc(dataset_dir.name)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head>"
        "<body>" + "".join(body) + "</body></html>\n"
    )
    return page, {"kind": kind, "rows": sampled["total"], "sampled": sampled["sampled"], "seconds": round(time.perf_counter() - started, 2), "random_weights": bool(banner)}


def write_report(dataset_dir: str | Location, out: str | Location, **options) -> dict:
    page, summary = render_report(dataset_dir, **options)
    out = location(out)
    write_text_atomic(out, page, make_parents=True)
    return {**summary, "out": str(out), "bytes": len(page.encode())}
