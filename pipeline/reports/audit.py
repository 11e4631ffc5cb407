"""`fgdata audit`: the hand check of hard negatives as a repeatable command.

FG-CLIP's "98.9% of negatives valid" and HierarCaps' "75% of hierarchies fully valid" are hand
checks. `audit sample` draws a stratified sample of candidate negatives (FgGRN: by attribute kind
and negatives backend, and by the quartile of the region's CLIP score where `fgdata quality` scored
it; HierarCaps: by tier) into one self-contained HTML page where a person
judges each as valid / invalid / unsure with the keyboard; the verdicts leave the page as JSON.
`audit score` turns them into valid rates with Wilson 95% intervals, per stratum and overall, and
records them in the dataset's manifest (and data card).

- Every stratum gets an equal share of the sample (what a small stratum cannot fill goes to the
  others), so each stratum's interval is as narrow as the sample allows; the overall rate is
  given both pooled over the sample and weighted by each stratum's size in the dataset.
- Streaming: one reservoir per stratum while the shards are read, so memory is strata x n.
- The page is static: items are rendered here with every text html-escaped (captions are hostile
  input); its one script is constant and allowed by hash in a Content-Security-Policy that also
  forbids every network fetch. An item's id on the page is a hex digest, never data: HTML rewrites
  CR, LF and NUL in an attribute, so keys differing only there would become one item.
- The verdicts file is hostile input too: `audit score` redraws the sample from the dataset, seed
  and n and takes strata and populations from it, so the file's ids must all be in that sample and
  nothing else in it is believed. It names a dataset only on a local path or a supported store.
- The dataset, its images ancestor and the verdicts file may be local paths or `s3://`, `gs://`,
  `hf://` URIs (core/storage); shards are read in batches there too, never downloaded whole.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import html
import io
import json
import math
import random
import statistics
import time
import warnings

import pyarrow as pa
from PIL import Image, ImageDraw

from pipeline.core import storage
from pipeline.core.shards import MANIFEST_FILE, find_ancestor, list_shards, open_shard, read_json, write_json
from pipeline.core.sources import read_regular_file
from pipeline.core.storage import Location, location
from pipeline.core.terminal import printable
from pipeline.datasets.datacard import walk_lineage, write_datacard, write_text_atomic
from pipeline.errors import FgdataError, first_line, shown
from pipeline.reports.html import BANNER_STYLE, random_weights_banner

VERDICTS_FORMAT = 1
VERDICTS = ("valid", "invalid", "unsure")
Z95 = 1.959963984540054  # the normal quantile of 0.975
MAX_ITEMS = 5000  # ~100 MB of page: more is no longer a hand check
# A page's download is ~100 bytes an item plus its strata names: far below this even at MAX_ITEMS.
MAX_VERDICTS_BYTES = 64 << 20
CROP_SIDE = 360  # the longest side an item's picture is shown at
BOX_COLOUR = (255, 0, 255)
_COLUMNS = {
    "fggrn": ["key", "short_caption", "long_caption", "phrase_source", "regions", "negatives_backend"],
    "hierarcaps": ["key", "tiers", "negative_tiers"],
}
REGION_SCORES = "region_clip_scores"  # `fgdata quality`'s per-region CLIP scores: a stratum by their quartile
QUARTILE_SAMPLE = 10_000  # scores kept (a seeded reservoir) to place the quartile edges: memory stays bounded

# Keys: v / i / u judge the item shown and move on; right arrow or n, left arrow or p move.
# Verdicts live in localStorage under the sample's id (a reload or a crash loses nothing) and in
# a Blob behind the download link, refreshed on every verdict.
_SCRIPT = """(function () {
  var root = document.documentElement, errors = 0;
  function note() { errors += 1; root.setAttribute('data-errors', String(errors)); }
  window.addEventListener('error', note, true);
  document.addEventListener('securitypolicyviolation', note);
  document.addEventListener('DOMContentLoaded', function () {
    var meta = JSON.parse(document.getElementById('audit-meta').textContent);
    var items = Array.prototype.slice.call(document.querySelectorAll('section.item'));
    var storeKey = 'fgdata-audit:' + meta.sample_id, verdicts = {}, current = 0, url = null;
    var known = {valid: 1, invalid: 1, unsure: 1};
    try {
      var saved = JSON.parse(localStorage.getItem(storeKey) || '{}');
      items.forEach(function (el) { var v = saved[el.dataset.id]; if (known[v]) { verdicts[el.dataset.id] = v; } });
    } catch (e) { /* no storage (private mode): the download still works */ }
    function payload() {
      return {fgdata_audit: meta.format, sample_id: meta.sample_id, dataset: meta.dataset, kind: meta.kind,
              seed: meta.seed, n: meta.n, strata: meta.strata,
              items: items.map(function (el) { return {id: el.dataset.id, stratum: el.dataset.stratum, verdict: verdicts[el.dataset.id] || null}; })};
    }
    function refresh() {
      var judged = Object.keys(verdicts).length, link = document.getElementById('download');
      if (url) { URL.revokeObjectURL(url); }
      url = URL.createObjectURL(new Blob([JSON.stringify(payload(), null, 1)], {type: 'application/json'}));
      link.href = url;
      document.getElementById('progress').textContent = 'item ' + (current + 1) + ' of ' + items.length + ', ' + judged + ' judged';
      var v = verdicts[items[current].dataset.id];
      var status = document.getElementById('verdict');
      status.textContent = v ? v : 'not judged';
      status.className = v || '';
    }
    function show(index) {
      current = Math.max(0, Math.min(items.length - 1, index));
      items.forEach(function (el, i) { el.hidden = i !== current; });
      refresh();
    }
    function judge(v) {
      verdicts[items[current].dataset.id] = v;
      try { localStorage.setItem(storeKey, JSON.stringify(verdicts)); } catch (e) { /* see above */ }
      show(current + 1 < items.length ? current + 1 : current);
    }
    var keys = {v: 'valid', i: 'invalid', u: 'unsure'};
    document.addEventListener('keydown', function (e) {
      if (e.ctrlKey || e.metaKey || e.altKey) { return; }
      var key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
      if (keys[key]) { judge(keys[key]); }
      else if (key === 'ArrowRight' || key === 'n') { show(current + 1); }
      else if (key === 'ArrowLeft' || key === 'p') { show(current - 1); }
      else { return; }
      e.preventDefault();
    });
    Array.prototype.forEach.call(document.querySelectorAll('button[data-verdict]'), function (b) {
      b.addEventListener('click', function () { judge(b.dataset.verdict); });
    });
    Array.prototype.forEach.call(document.querySelectorAll('button[data-move]'), function (b) {
      b.addEventListener('click', function () { show(current + Number(b.dataset.move)); });
    });
    window.fgdataAudit = {verdicts: payload, current: function () { return current; }};
    if (items.length) { show(0); }
    root.setAttribute('data-audit-ready', '1');
  });
})();"""
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
CSP = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{_SCRIPT_HASH}'"

_STYLE = BANNER_STYLE + """
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 60em; color: #222; }
.bar { display: flex; gap: .6em; align-items: center; flex-wrap: wrap; margin: .8em 0; }
.item dl { display: grid; grid-template-columns: 11em 1fr; gap: .3em 1em; overflow-wrap: anywhere; }
.item dt { color: #555; } .pos { color: #064; font-weight: bold; } .neg { color: #a00; font-weight: bold; }
.item img { display: block; background: #333; margin: .5em 0; }
.note { color: #555; } #verdict.valid { color: #064; } #verdict.invalid { color: #a00; } #verdict.unsure { color: #a60; }
kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 .3em; }
"""


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion; None with no trials. Unlike p +- z*se it
    stays inside [0, 1] and is honest at 0 or n successes, which a good negatives set hits."""
    if trials <= 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# --- sampling --------------------------------------------------------------------------------


def _item_id(*parts) -> str:
    """An item's id: a digest of where it is and of the texts judged, so it survives HTML (hex
    only) and a verdict never carries over to a regenerated negative of the same position."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]  # repr: one line of printable text, any value


def _finite_scores(values) -> list[float]:
    return [v for v in values or [] if isinstance(v, (int, float)) and math.isfinite(v)]


def region_score_quartiles(shards: list[Location], seed: int) -> list[float] | None:
    """The three cut points between the quartiles of the regions' CLIP scores (from a seeded
    reservoir of at most QUARTILE_SAMPLE of them), or None when fewer than two regions have one."""
    rng, kept, seen = random.Random(seed), [], 0
    for shard in shards:
        try:
            parquet = open_shard(shard)
            if REGION_SCORES not in parquet.schema_arrow.names:
                continue
            for batch in parquet.iter_batches(batch_size=1024, columns=[REGION_SCORES]):
                for score in (s for scores in batch.column(0).to_pylist() for s in _finite_scores(scores)):
                    seen += 1
                    if len(kept) < QUARTILE_SAMPLE:
                        kept.append(score)
                    elif (slot := rng.randrange(seen)) < QUARTILE_SAMPLE:
                        kept[slot] = score
        except (pa.ArrowException, OSError) as exc:
            raise FgdataError(f"{shard}: cannot read shard ({first_line(exc)})") from None
    return statistics.quantiles(kept, n=4) if len(kept) >= 2 else None


def _score_stratum(scores: list, r: int, quartiles: list[float]) -> str:
    score = scores[r] if isinstance(scores, list) and r < len(scores) else None
    if not _finite_scores([score]):
        return "region score unknown"
    return f"region score Q{bisect.bisect_right(quartiles, score) + 1}"


def _candidates(kind: str, row: dict, shard: str, quartiles: list[float] | None = None):
    """(stratum, item) for every candidate negative of one row; malformed parts are skipped."""
    key = str(row.get("key"))
    if kind == "fggrn":
        backend = str(row.get("negatives_backend") or "unknown backend")
        caption = row.get("long_caption") if row.get("phrase_source") == "long_caption" else row.get("short_caption")
        for r, region in enumerate(row.get("regions") or []):
            for n, negative in enumerate((region or {}).get("negatives") or []):
                if not negative or not negative.get("text"):
                    continue
                attribute = str(negative.get("attribute") or "unknown")
                stratum = f"{attribute} | {backend}" + (f" | {_score_stratum(row.get(REGION_SCORES), r, quartiles)}" if quartiles else "")
                yield stratum, {
                    "id": _item_id(shard, key, r, n, region.get("phrase"), negative["text"]), "stratum": stratum, "shard": shard, "key": key, "attribute": attribute,
                    "positive": region.get("phrase"), "candidate": negative["text"], "context": caption, "box": region.get("box"),
                    "scores": {name: negative.get(name) for name in ("contradiction", "entailment", "neutral")},
                }
    else:
        tiers, negatives = row.get("tiers") or [], row.get("negative_tiers") or []
        for t, (positive, negative) in enumerate(zip(tiers, negatives)):
            if not negative:
                continue
            yield f"tier {t + 1}", {
                "id": _item_id(shard, key, t, positive, negative), "stratum": f"tier {t + 1}", "shard": shard, "key": key, "tier": t + 1,
                "positive": positive, "candidate": negative, "parent": tiers[t - 1] if t else None, "chain": list(tiers),
            }


def _allocate(available: dict[str, int], n: int) -> dict[str, int]:
    """An equal share of `n` per stratum; what a small stratum cannot use goes to the others."""
    share = dict.fromkeys(available, 0)
    left, open_strata = n, sorted(s for s, count in available.items() if count)
    while left and open_strata:
        each = max(1, left // len(open_strata))
        for stratum in list(open_strata):
            take = min(each, available[stratum] - share[stratum], left)
            share[stratum] += take
            left -= take
            if share[stratum] == available[stratum]:
                open_strata.remove(stratum)
            if not left:
                break
    return share


def draw_sample(dataset_dir: str | Location, n: int, seed: int = 0) -> tuple[str, list[dict], dict[str, dict]]:
    """(kind, the sampled items in a shuffled order, per stratum its population and sample size)."""
    dataset_dir = location(dataset_dir)
    manifest = read_json(dataset_dir / MANIFEST_FILE) if dataset_dir.is_dir() else None
    if manifest is None:
        raise FgdataError(f"{dataset_dir}: no {MANIFEST_FILE}; give a finished fggrn or hierarcaps dataset written by fgdata")
    kind = manifest.get("kind")
    if kind not in _COLUMNS:
        raise FgdataError(f"{dataset_dir}: a {kind!r} dataset has no negatives to audit; give an fggrn or hierarcaps dataset")
    rng = random.Random(seed)
    reservoirs: dict[str, list[dict]] = {}
    seen: dict[str, int] = {}
    shards = list_shards(dataset_dir)
    quartiles = region_score_quartiles(shards, seed) if kind == "fggrn" else None
    for shard in shards:
        try:
            parquet = open_shard(shard)
            missing = [c for c in _COLUMNS[kind] if c not in parquet.schema_arrow.names]
            if missing:
                raise FgdataError(f"{shard}: missing required column(s) {', '.join(missing)} of a {kind} shard")
            scores = [REGION_SCORES] if quartiles and REGION_SCORES in parquet.schema_arrow.names else []
            for batch in parquet.iter_batches(batch_size=1024, columns=_COLUMNS[kind] + scores):
                for row in batch.to_pylist():
                    for stratum, item in _candidates(kind, row, shard.name, quartiles):
                        count = seen[stratum] = seen.get(stratum, 0) + 1
                        reservoir = reservoirs.setdefault(stratum, [])
                        if len(reservoir) < n:  # Algorithm R: every candidate stays with probability n/count
                            reservoir.append(item)
                        elif (slot := rng.randrange(count)) < n:
                            reservoir[slot] = item
        except (pa.ArrowException, OSError) as exc:
            raise FgdataError(f"{shard}: cannot read shard ({first_line(exc)})") from None
    if not seen:
        raise FgdataError(f"{dataset_dir}: no candidate negatives in any row, nothing to audit")
    share = _allocate({s: len(r) for s, r in reservoirs.items()}, n)
    items = [item for stratum in sorted(reservoirs) for item in rng.sample(reservoirs[stratum], share[stratum])]
    rng.shuffle(items)  # strata interleaved, so a judge's mood drifts over all of them alike
    strata = {s: {"population": seen[s], "sampled": share[s]} for s in sorted(seen)}
    return kind, items, strata


# --- pictures --------------------------------------------------------------------------------


def _finite_box(box, width: int, height: int, scale: float = 1.0) -> tuple[float, float, float, float] | None:
    """The box clipped to the image, in pixels of the decoded image (`scale` of the stored one),
    or None when it is not four finite numbers or covers less than a pixel."""
    try:
        x1, y1, x2, y2 = (float(v) * scale for v in box)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    x1, x2 = sorted((max(0.0, min(x1, width)), max(0.0, min(x2, width))))
    y1, y2 = sorted((max(0.0, min(y1, height)), max(0.0, min(y2, height))))
    return (x1, y1, x2, y2) if x2 - x1 >= 1 and y2 - y1 >= 1 else None


def picture_uri(data: bytes | None, box=None) -> tuple[str | None, str]:
    """(PNG data URI of the crop around `box` with the box drawn, or of the whole image; a note).
    The crop keeps half the box's size as context on every side, so the judge sees what is near."""
    if not data:
        return None, "no image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            stored_width = image.size[0]
            image.draft("RGB", (4 * CROP_SIDE, 4 * CROP_SIDE))  # a large JPEG decodes at a smaller scale
            image = image.convert("RGB")
            scale = image.size[0] / stored_width
    except Exception:  # noqa: BLE001 - an undecodable image is shown as "no image", never a crash
        return None, "image does not decode"
    note, drawn = "", None
    if box is not None:
        drawn = _finite_box(box, *image.size, scale=scale)
        note = "" if drawn else "the box is empty or outside the image: whole image shown"
    if drawn:
        x1, y1, x2, y2 = drawn
        margin_x, margin_y = (x2 - x1) / 2, (y2 - y1) / 2
        left, top = int(max(0, x1 - margin_x)), int(max(0, y1 - margin_y))
        crop = image.crop((left, top, int(min(image.size[0], x2 + margin_x + 1)), int(min(image.size[1], y2 + margin_y + 1))))
        drawn = (x1 - left, y1 - top, x2 - left, y2 - top)
        image = crop
    factor = CROP_SIDE / max(image.size)
    image = image.resize((max(1, round(image.size[0] * factor)), max(1, round(image.size[1] * factor))), Image.BICUBIC)
    if drawn:  # drawn after resizing, so the outline is 3 pixels whatever the zoom
        ImageDraw.Draw(image).rectangle([round(v * factor) for v in drawn], outline=BOX_COLOUR, width=3)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), note


def _image_bytes(images_dir: Location | None, items: list[dict]) -> dict[str, bytes]:
    """key -> image bytes for the items' keys: the shard of the same name first, then the rest."""
    found: dict[str, bytes] = {}
    if images_dir is None:
        return found
    wanted = {item["key"] for item in items}
    try:
        shards = list_shards(images_dir)
    except FgdataError:
        return found
    names = {item["shard"] for item in items}
    for shard in sorted(shards, key=lambda s: s.name not in names):
        left = wanted - set(found)
        if not left:
            break
        try:
            for batch in open_shard(shard).iter_batches(batch_size=256, columns=["key", "image"]):
                keys = batch.column(0).to_pylist()
                for index in (i for i, key in enumerate(keys) if key in left):
                    found[keys[index]] = batch.column(1)[index].as_py()
        except (pa.ArrowException, OSError, ValueError, KeyError):
            continue  # a damaged image shard: its items say "no image"
    return found


# --- the page --------------------------------------------------------------------------------


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _json_in_html(payload) -> str:
    """JSON safe inside a <script type=application/json>: no '<' can close the element."""
    return json.dumps(payload).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _item_html(kind: str, item: dict, picture: tuple[str | None, str]) -> str:
    uri, note = picture
    image = f"<img alt='the image, box drawn' src='{uri}'>" if uri else ""
    if note:
        image += f"<p class='note'>{esc(note)}</p>"
    if kind == "fggrn":
        scores = ", ".join(f"{name} {value:.3f}" for name, value in item["scores"].items() if isinstance(value, float) and math.isfinite(value))
        rows = [("Changed attribute", esc(item["attribute"])), ("Positive (in the box)", f"<span class='pos'>{esc(item['positive'])}</span>"),
                ("Candidate negative", f"<span class='neg'>{esc(item['candidate'])}</span>"), ("Caption", esc(item["context"])), ("NLI scores", esc(scores or "none"))]
        question = "Valid when the candidate contradicts what the box shows, changes one attribute only and reads as fluent English."
    else:
        rows = [("Tier", esc(item["tier"])), ("Tier above", esc(item["parent"] if item["parent"] is not None else "(none: top tier)")),
                ("Positive", f"<span class='pos'>{esc(item['positive'])}</span>"), ("Candidate negative", f"<span class='neg'>{esc(item['candidate'])}</span>"),
                ("Chain", esc(" => ".join(str(t) for t in item["chain"])))]
        question = "Valid when the candidate contradicts the tier's positive and is still entailed by the tier above."
    cells = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in rows)
    return (f"<section class='item' data-id='{esc(item['id'])}' data-stratum='{esc(item['stratum'])}' hidden>{image}<dl>{cells}</dl>"
            f"<p class='note'>{esc(question)} Stratum {esc(item['stratum'])}; key {esc(item['key'])}.</p></section>")


def render_audit_page(dataset_dir: str | Location, n: int = 200, seed: int = 0) -> tuple[str, dict]:
    started = time.perf_counter()
    dataset_dir = storage.resolved(dataset_dir)  # a local path resolved, or a URI as given
    kind, items, strata = draw_sample(dataset_dir, n, seed)
    images_dir = find_ancestor(dataset_dir, "images")
    pictures = _image_bytes(images_dir, items)
    sample_id = hashlib.sha256(f"{dataset_dir}\0{seed}\0".encode() + "\0".join(i["id"] for i in items).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    meta = {"format": VERDICTS_FORMAT, "sample_id": sample_id, "dataset": str(dataset_dir), "kind": kind, "seed": seed, "n": n, "strata": strata}
    sections = [_item_html(kind, item, picture_uri(pictures.get(item["key"]), item.get("box"))) for item in items]
    strata_rows = "".join(f"<tr><td>{esc(s)}</td><td>{v['population']}</td><td>{v['sampled']}</td></tr>" for s, v in strata.items())
    buttons = ("<button data-verdict='valid'><kbd>v</kbd> valid</button><button data-verdict='invalid'><kbd>i</kbd> invalid</button>"
               "<button data-verdict='unsure'><kbd>u</kbd> unsure</button><button data-move='-1'><kbd>&larr;</kbd> previous</button>"
               "<button data-move='1'>next <kbd>&rarr;</kbd></button>"
               f"<a id='download' download='audit-verdicts-{sample_id}.json' href='#'>download verdicts (JSON)</a>")
    page = (
        "<!DOCTYPE html>\n<html lang='en' data-errors='0'><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>fgdata audit: {esc(dataset_dir.name)}</title><style>{_STYLE}</style>"
        f"<script type='application/json' id='audit-meta'>{_json_in_html(meta)}</script><script>{_SCRIPT}</script></head><body>"
        f"<h1>fgdata audit: {esc(kind)} {esc(dataset_dir.name)}</h1>{random_weights_banner(walk_lineage(dataset_dir))}"
        f"<p class='note'>{len(items)} candidate negatives sampled (seed {seed}) from <code>{esc(dataset_dir)}</code>. Keys: <kbd>v</kbd> valid, "
        "<kbd>i</kbd> invalid, <kbd>u</kbd> unsure (each moves on), <kbd>&rarr;</kbd>/<kbd>n</kbd> next, <kbd>&larr;</kbd>/<kbd>p</kbd> previous. "
        "Verdicts are kept in this browser and in the download; score them with <code>fgdata audit score FILE.json</code>.</p>"
        f"<div class='bar'>{buttons}<span id='progress'></span> <strong id='verdict'></strong></div>"
        + "".join(sections)
        + f"<details><summary>Strata</summary><table><tr><th>stratum</th><th>candidates in the dataset</th><th>sampled</th></tr>{strata_rows}</table></details>"
        "</body></html>\n"
    )
    summary = {"kind": kind, "items": len(items), "strata": strata, "images": sum(1 for i in items if i["key"] in pictures),
               "sample_id": sample_id, "seconds": round(time.perf_counter() - started, 2)}
    return page, summary


def write_audit_page(dataset_dir: str | Location, out: str | Location, n: int = 200, seed: int = 0) -> dict:
    if not 1 <= n <= MAX_ITEMS:
        raise FgdataError(f"--n must be between 1 and {MAX_ITEMS:,} (a page of n inline images; 200 judged at a 95% valid rate already give +-3 points)")
    page, summary = render_audit_page(dataset_dir, n, seed)
    out = location(out)
    write_text_atomic(out, page, make_parents=True)
    return summary


# --- scoring ---------------------------------------------------------------------------------


def read_verdicts(path: str | Location) -> dict:
    """The page's download, checked: anything else is a one-line error that says what is wrong."""
    try:
        payload = json.loads(read_regular_file(str(path), MAX_VERDICTS_BYTES).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested deeper than Python recurses
        raise FgdataError(f"{path}: not a readable verdicts file ({first_line(exc)}); give the JSON the audit page downloads") from None
    # type(...) is int: JSON's true and 1.0 equal 1 in Python but are no format number
    if not isinstance(payload, dict) or type(payload.get("fgdata_audit")) is not int or payload["fgdata_audit"] != VERDICTS_FORMAT \
            or not isinstance(payload.get("items"), list):
        raise FgdataError(f"{path}: not an fgdata audit verdicts file (format {VERDICTS_FORMAT}); give the JSON the audit page downloads")
    seen = set()
    for index, item in enumerate(payload["items"]):
        if not (isinstance(item, dict) and isinstance(item.get("id"), str)):
            raise FgdataError(f"{path}: item {index} lacks a string id")
        if item.get("verdict") not in (*VERDICTS, None):
            raise FgdataError(f"{path}: item {index} has verdict {shown(item.get('verdict'))}; expected one of {', '.join(VERDICTS)} or null")
        if item["id"] in seen:
            raise FgdataError(f"{path}: item {shown(item['id'])} appears twice")
        seen.add(item["id"])
    return payload


def _page_text(value) -> str | None:
    """A text the page put in the verdicts file, recorded as given when it is one a page writes."""
    return value if isinstance(value, str) and len(value) <= 4096 else None


def _rate(counts: dict) -> dict:
    judged = counts["valid"] + counts["invalid"]
    interval = wilson_interval(counts["valid"], judged)
    return {**counts, "judged": judged, "valid_rate": counts["valid"] / judged if judged else None, "wilson95": list(interval) if interval else None}


def score_verdicts(payload: dict) -> dict:
    """Valid rate = valid / (valid + invalid), unsure and unjudged counted apart, per stratum and
    overall, each with its Wilson 95% interval."""
    blank = {name: 0 for name in (*VERDICTS, "unjudged")}
    strata: dict[str, dict] = {}
    for item in payload["items"]:
        strata.setdefault(item["stratum"], dict(blank))[item["verdict"] or "unjudged"] += 1
    total = {name: sum(s[name] for s in strata.values()) for name in blank}
    if not total["valid"] + total["invalid"]:
        raise FgdataError("no item is judged valid or invalid yet; judge some on the audit page and download the verdicts again")
    result = {"overall": _rate(total), "strata": {name: _rate(counts) for name, counts in sorted(strata.items())}}
    # a stratified sample over-represents small strata: weight each stratum's rate by its size
    population = {name: (payload.get("strata") or {}).get(name, {}).get("population") for name in strata}
    weighted = [(population[name], rate["valid_rate"]) for name, rate in result["strata"].items() if rate["valid_rate"] is not None]
    if weighted and all(isinstance(size, int) and size > 0 for size, _ in weighted):
        result["overall"]["weighted_valid_rate"] = sum(size * rate for size, rate in weighted) / sum(size for size, _ in weighted)
        for name, rate in result["strata"].items():
            rate["population"] = population[name]
    return result


def audited_dataset(verdicts_path: str | Location, payload: dict, dataset_dir: str | Location | None = None) -> Location:
    """Where the audit is recorded: --dataset, else the dataset the verdicts file names, which must
    be a local path or on a supported store (any other fsspec URL would be fetched, or written)."""
    if dataset_dir is None:
        dataset_dir = payload.get("dataset")
        if not isinstance(dataset_dir, str) or not dataset_dir:
            raise FgdataError(f"{verdicts_path}: names no dataset; give --dataset")
    try:
        dataset_dir = location(dataset_dir)  # refuses any scheme but s3, gs and hf: fsspec would fetch http://, ftp://, ...
        manifest = read_json(dataset_dir / MANIFEST_FILE) if dataset_dir.is_dir() else None
    except (OSError, ValueError) as exc:  # a name with NUL, or too long for the file system
        raise FgdataError(f"{shown(str(dataset_dir), 200)}: not a dataset path ({shown(first_line(exc))}); give the audited dataset with --dataset") from None
    if manifest is None:
        raise FgdataError(f"{shown(str(dataset_dir), 200)}: no {MANIFEST_FILE} to record the audit in; give the audited dataset with --dataset")
    if payload.get("kind") not in (None, manifest.get("kind")):
        raise FgdataError(f"{verdicts_path} audits a {shown(payload.get('kind'))} dataset but {shown(str(dataset_dir), 200)} is {manifest.get('kind')!r}; "
                          "give the audited dataset with --dataset")
    return dataset_dir


def record_audit(verdicts_path: str | Location, payload: dict, dataset_dir: Location) -> dict:
    """Scores the verdicts against the sample redrawn from `dataset_dir` and records them under
    manifest["audit"] (and in the data card). Every id must be in that sample: ids from another
    dataset, seed or n, or made up, are refused rather than scored or written anywhere."""
    seed, n = payload.get("seed"), payload.get("n", len(payload["items"]))  # pages before "n" sampled len(items)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (seed, n)) or not 1 <= n <= MAX_ITEMS:
        raise FgdataError(f"{verdicts_path}: no whole-number seed and n (1 to {MAX_ITEMS:,}) to redraw its sample with; give the JSON the audit page downloads")
    _, items, strata = draw_sample(dataset_dir, n, seed)
    sample = {item["id"]: item for item in items}
    bad = next((item["id"] for item in payload["items"] if item["id"] not in sample), None)
    if bad is not None:
        raise FgdataError(f"{verdicts_path}: item {shown(bad)} is not in the sample of {shown(str(dataset_dir), 200)} drawn with the file's seed and n; "
                          "give the dataset the page was drawn from, unchanged since, with --dataset")
    # the strata come from the redrawn sample: names and populations as the data has them
    judged = [{"stratum": sample[item["id"]]["stratum"], "verdict": item["verdict"]} for item in payload["items"]]
    scores = score_verdicts({"items": judged, "strata": strata})
    audit = {
        **scores["overall"], "n": scores["overall"]["judged"], "strata": scores["strata"], "interval": "Wilson 95% (z 1.96) on valid / (valid + invalid)",
        "sample_id": _page_text(payload.get("sample_id")), "sampled_from": _page_text(payload.get("dataset")), "seed": seed, "sample_size": n,
        "verdicts_file": str(storage.resolved(verdicts_path)), "scored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest = read_json(dataset_dir / MANIFEST_FILE)
    manifest["audit"] = audit
    write_json(dataset_dir / MANIFEST_FILE, manifest)
    write_datacard(dataset_dir, manifest)
    return audit


def score_audit(verdicts_path: str | Location, dataset_dir: str | Location | None = None) -> tuple[dict, Location]:
    """`record_audit` of the verdicts file in the dataset it names, or in `dataset_dir`."""
    payload = read_verdicts(verdicts_path)
    dataset_dir = audited_dataset(verdicts_path, payload, dataset_dir)
    return record_audit(verdicts_path, payload, dataset_dir), dataset_dir


def format_scores(audit: dict) -> str:
    def line(name: str, rate: dict) -> str:
        if rate["valid_rate"] is None:
            value = "no valid/invalid verdicts"
        else:
            low, high = rate["wilson95"]
            value = f"{rate['valid_rate']:.3f} [{low:.3f}, {high:.3f}]"
        return f"{printable(name)[:40]:<40} {rate['valid']:>6} {rate['invalid']:>8} {rate['unsure']:>7} {rate['unjudged']:>9}  {value}"

    lines = [f"{'stratum':<40} {'valid':>6} {'invalid':>8} {'unsure':>7} {'unjudged':>9}  valid rate [Wilson 95%]"]
    lines += [line(name, rate) for name, rate in audit["strata"].items()]
    lines.append(line("overall (pooled)", audit))
    if "weighted_valid_rate" in audit:
        lines.append(f"overall weighted by stratum size: {audit['weighted_valid_rate']:.3f}")
    return "\n".join(lines)
