"""DATACARD.md: a datasheet written next to every dataset's `_manifest.json`.

It answers, for a person deciding whether to use the data, what `_manifest.json` answers for a
machine: where the data came from and under which licence, which models (and revisions) and
prompts (and hashes) made it, how they sampled, what was thrown away and why, what a hand audit
found, what it cannot be trusted for, and whether random-weight models were involved (then the
data is noise). Everything comes from the manifests of the dataset and its ancestors; what they
do not record is written as unknown, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Config
from pipeline.core.shards import MANIFEST_FILE, read_json, write_text
from pipeline.core.storage import location
from pipeline.errors import FgdataError, first_line

DATACARD_FILE = "DATACARD.md"
# The settings of each stage's config section that name the models it ran and say how they sampled,
# per backend where a stage has several: the card lists only these, never a model that did not run
# (the LLM of negatives under the rules backend, the seed LLM's sampling on hierarcaps-filter).
_LLM = (("backend", "model", "revision"), ("temperature", "top_p", "max_new_tokens", "seed"))
_RAN: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "recaption": {"": (_LLM[0], (*_LLM[1], "retry_temperature"))},
    "phrases": {"": (("spacy_model",), ())},
    "screen": {"": (("model",), ())},
    # agreement_detector is null (left out) unless a second detector ran
    "ground": {"yolo_world": (("backend", "detector", "text_encoder", "agreement_detector"), ()), "owlv2": (("backend", "owl_model", "agreement_detector"), ())},
    "quality": {"": (("model", "revision"), ())},
    "negatives": {
        "rules": (("backend", "spacy_model", "nli_model", "embedding_model"), ("seed",)),
        "": (("backend", "model", "revision", "spacy_model", "nli_model", "embedding_model"), _LLM[1]),
    },
    "hierarcaps-seed": {"": _LLM},
    "hierarcaps-augment": {"": _LLM},
    "hierarcaps-filter": {"": (("nli_model",), ())},
    "hierarcaps-negatives": {"": (("nli_model",), ())},
    "hierarcaps-generate": {"": (("generator",), ("num_beams", "negative_candidates", "candidate_temperature", "candidate_top_p", "generate_max_new_tokens", "seed"))},
}
# Quality floors: per stage, the settings of its section below which it keeps rows its default
# would drop. One set lower than its default is "opened" and named under a warning at the top.
QUALITY_FLOORS: dict[str, tuple[str, ...]] = {
    "phrases": ("min_latin_fraction", "min_english_fraction"),
    "recaption": ("min_words", "min_latin_fraction", "min_english_fraction", "min_distinct_trigrams"),
    "ground": ("score_threshold", "min_box_area"),
    "negatives": ("min_contradiction",),
    "hierarcaps-filter": ("min_entailment",),
    "hierarcaps-negatives": ("min_entailment", "min_negative_contradiction"),
}
# files beside a source that may state its licence
_LICENCE_NAMES = ("LICENSE", "LICENCE", "COPYING", "LICENSE.txt", "LICENSE.md", "LICENCE.md", "README.md", "README.txt", "README")
_MAX_DEPTH = 32  # a lineage deeper than this is a loop or damage, not a pipeline

_LIMITATIONS = {
    # and what image_curation finds in the lineage
    "images": ["Images are as the source gave them after decoding checks, except for what the lines below say was removed."],
    "captions": ["Long captions are model output: they can describe things that are not in the image (hallucination); no one checked them by hand unless an audit is recorded."],
    "phrases": ["Phrases come from a rule-based parser (spaCy): long or ungrammatical captions give missed or partial phrases."],
    "regions": ["Boxes come from an open-vocabulary detector: one box per phrase at most is right, low-score boxes are often wrong, and small or crowded objects are missed."],
    "fggrn": [
        "Boxes come from an open-vocabulary detector and can be wrong, especially at low scores.",
        "Hard negatives change one attribute by a rule or an LLM and are checked by an NLI model: some are still true of the image or are not fluent (FG-CLIP's reference set was 98.9% valid by hand).",
    ],
    "hierarcaps": ["Chains and negatives are model output kept by an NLI filter: a chain can still be off (the HierarCaps paper judged about 75% fully valid by hand)."],
}


def walk_lineage(dataset_dir: Path, manifest: dict | None = None) -> list[dict]:
    """The dataset and every ancestor named by manifest `inputs`, sources first, each once:
    {path, stage, kind, manifest (None for a source or a vanished input), error (why its manifest
    could not be read), depth}. A damaged ancestor is recorded, not fatal: the card still gets written."""
    steps: dict[str, dict] = {}

    def visit(path: str, recorded: dict, depth: int) -> None:
        if path in steps or depth > _MAX_DEPTH:
            return
        step = {"path": path, "stage": recorded.get("stage"), "kind": None, "manifest": None, "error": None, "depth": depth, "format": recorded.get("format")}
        steps[path] = step
        loaded = None
        if depth == 0 and manifest is not None:
            loaded = manifest
        else:
            try:  # a local path or a URI; a store that cannot be reached now is a step not read, not a failure
                place = location(path)
                loaded = read_json(place / MANIFEST_FILE) if place.is_dir() else None
            except FgdataError as exc:
                step["error"] = str(exc)
            except Exception as exc:  # noqa: BLE001 - object-store clients raise their own errors
                step["error"] = f"{path}: {first_line(exc)}"
        if loaded is not None:
            step.update(manifest=loaded, stage=loaded.get("stage", step["stage"]), kind=loaded.get("kind"))
        parents = (loaded or recorded).get("inputs") or []
        for parent in parents if isinstance(parents, list) else []:
            if isinstance(parent, dict) and isinstance(parent.get("path"), str):
                visit(parent["path"], parent, depth + 1)

    visit(str(dataset_dir), {}, 0)
    # sources (deepest) first, the dataset itself last
    return sorted(steps.values(), key=lambda s: -s["depth"])


def image_curation(steps: list[dict]) -> list[str]:
    """What the lineage did about duplicate and NSFW images: whether `dedup` and `screen` ran, and
    then by which rule and model (from their manifests), so a card never claims a filter that did not run."""
    ran = {s["stage"]: s for s in steps if s["manifest"] and s["stage"] in ("dedup", "screen")}
    lines = []
    if "dedup" in ran:
        distance = _section(ran["dedup"]["manifest"]).get("max_distance")
        lines.append(
            f"Duplicate images were removed by `fgdata dedup` (`{_text(ran['dedup']['path'])}`): the same decoded pixels, or a 64-bit pHash within Hamming "
            f"distance {'unknown' if distance is None else _text(distance)} (`dedup.max_distance`). Crops, mirrored or heavily edited copies are kept; "
            "captions are only counted as repeats, never removed."
        )
    else:
        lines.append("No duplicate filtering in the lineage (`fgdata dedup` did not run): the same image can appear more than once.")
    if "screen" in ran:
        manifest = ran["screen"]["manifest"]
        model, rule = _provenance(manifest, "screen_model"), _provenance(manifest, "nsfw_rule")
        lines.append(
            f"NSFW images were rejected by `fgdata screen` (`{_text(ran['screen']['path'])}`) with {model}: {rule}. A detector misses some; "
            "other content (violence, hate symbols, text in the image) is not screened."
        )
    else:
        lines.append("No NSFW screening in the lineage (`fgdata screen` did not run): explicit images may be present.")
    return lines


def _provenance(manifest: dict, name: str) -> str:
    """A provenance entry (one value per shard, repeats folded) as text, or 'unknown'."""
    provenance = manifest.get("provenance") if isinstance(manifest.get("provenance"), dict) else {}
    values = provenance.get(name)
    values = values if isinstance(values, list) else [values]
    return ", ".join(dict.fromkeys(_text(v) for v in values if v is not None)) or "unknown"


def random_weight_steps(steps: list[dict]) -> list[str]:
    """The stages whose manifest says a random-weight model made their output."""
    found = []
    for step in steps:
        provenance = (step["manifest"] or {}).get("provenance") or {}
        values = provenance.get("random_weights") if isinstance(provenance, dict) else None
        if values is True or (isinstance(values, list) and True in values):
            found.append(f"{step['stage']} ({step['path']})")
    return found


def model_notes(steps: list[dict]) -> list[str]:
    """What the lineage's manifests say a model's output is worth ("model_note": a packaged demo
    model's real but small weights), as "<stage>: <note>"."""
    found = []
    for step in steps:
        provenance = (step["manifest"] or {}).get("provenance") or {}
        values = provenance.get("model_note") if isinstance(provenance, dict) else None
        for note in values if isinstance(values, list) else [values]:
            if isinstance(note, str) and f"{step['stage']}: {note}" not in found:
                found.append(f"{step['stage']}: {note}")
    return found


def licence_note(path: str) -> str:
    """Where a source's licence is stated, or 'unknown'. Only files beside the source (in its folder,
    then the folder above, where a dataset's README usually sits) are looked at; a README counts
    only when it mentions a licence."""
    source = Path(path)
    folder = source if source.is_dir() else source.parent
    if "://" in path or not folder.is_dir():
        return "unknown (no licence file can be read beside this source)"
    for candidate in (where / name for where in (folder, folder.parent) for name in _LICENCE_NAMES):
        try:
            if not candidate.is_file():
                continue
            if candidate.name.upper().startswith("README") and "licen" not in candidate.read_text(errors="replace")[:200_000].lower():
                continue
        except OSError:
            continue
        return f"see {candidate}"
    return "unknown (no LICENSE, LICENCE, COPYING or README stating a licence beside it or in the folder above)"


def _section_name(manifest: dict) -> str:
    """The config section the stage that wrote `manifest` reads (stage `hierarcaps-filter` reads `hierarcaps`)."""
    return str(manifest.get("stage") or "").split("-")[0]


def _section(manifest: dict) -> dict:
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    section = config.get(_section_name(manifest))
    return section if isinstance(section, dict) else {}


def _ran_settings(manifest: dict) -> tuple[dict, dict]:
    """(model settings, sampling settings) of what the stage that wrote `manifest` ran; none for a stage
    `_RAN` does not know (its provenance still names what it ran)."""
    section = _section(manifest)
    backends = _RAN.get(str(manifest.get("stage")), {})
    models, sampling = backends.get(str(section.get("backend")), backends.get("", ((), ())))
    return {k: section[k] for k in models if section.get(k) not in (None, "")}, {k: section[k] for k in sampling if k in section}


def opened_floors(steps: list[dict]) -> list[str]:
    """Every QUALITY_FLOORS setting a step of the lineage ran below its default, as one line each."""
    defaults, found = Config(), []
    for step in steps:
        manifest = step["manifest"] or {}
        name, section = _section_name(manifest), _section(manifest)
        for key in QUALITY_FLOORS.get(str(manifest.get("stage")), ()):
            value, default = section.get(key), getattr(getattr(defaults, name), key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < default:
                found.append(f"`{name}.{key}={_text(value)}` (default {default}) in {_text(manifest.get('stage'))} `{_text(step['path'])}`")
    return found


def _text(value) -> str:
    """One line of Markdown-safe text: values come from user data (paths, model ids), so a newline or
    a pipe cannot break the card's layout."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("\r", " ").replace("\n", " ").replace("|", "\\|")


def _rows(manifest: dict, name: str):
    value = manifest.get(name)
    return value if isinstance(value, int) else "unknown"


def render_datacard(dataset_dir: Path, manifest: dict) -> str:
    steps = walk_lineage(dataset_dir, manifest)
    randoms = random_weight_steps(steps)
    kind = manifest.get("kind", "unknown")
    versions = manifest.get("versions") if isinstance(manifest.get("versions"), dict) else {}
    out = [
        f"# Data card: {_text(location(dataset_dir).name)}",
        "",
        f"A `{_text(kind)}` dataset written by `fgdata {_text(manifest.get('stage', 'unknown'))}` on {_text(manifest.get('created_at', 'an unknown date'))} "
        f"(fgdata {_text(versions.get('fgdata', 'unknown'))}). Machine-readable details: `{MANIFEST_FILE}`.",
        "",
    ]
    if randoms:
        out += [f"> **RANDOM WEIGHTS**: {_text(', '.join(randoms))} used a random-weight model (offline demo or test). Its output is noise: do not train on it.", ""]
    for note in model_notes(steps):
        out += [f"> **DEMO MODEL**: {_text(note)}", ""]
    floors = opened_floors(steps)
    if floors:
        out += ["> **OPENED QUALITY FLOORS**: rows that the default settings drop are kept here, as these were set below their defaults: "
                + "; ".join(floors) + ". Expect more wrong boxes, captions or negatives than the defaults give.", ""]

    out += ["## Random weights", "", f"{'Yes: ' + _text(', '.join(randoms)) if randoms else 'No: no step in the lineage records a random-weight model.'}", ""]

    out += ["## Opened quality floors", "", *([f"- {line}" for line in floors] or ["None: every quality floor is at its default or stricter."]), ""]

    out += ["## Composition", "", "| rows in | rows out | rejected | shards |", "| --- | --- | --- | --- |"]
    shards = manifest.get("shards")
    out += [f"| {_rows(manifest, 'rows_in')} | {_rows(manifest, 'rows_out')} | {_rows(manifest, 'rows_rejected')} | {len(shards) if isinstance(shards, list) else 'unknown'} |", ""]

    out += ["## Sources and licences", ""]
    sources = [s for s in steps if s["manifest"] is None and s["depth"] > 0]
    if not sources:
        out.append("- unknown: the lineage records no source (a generated dataset, or an input whose manifest is gone)")
    for source in sources:
        what = f"format {source['format']}" if source["format"] else (f"written by `{source['stage']}`, manifest missing" if source["stage"] else "no manifest")
        out.append(f"- `{_text(source['path'])}` ({_text(what)}): licence {_text(licence_note(source['path']))}")
    out.append("")

    out += ["## Lineage", "", "| step | dataset | rows in | rows out | rejected |", "| --- | --- | --- | --- | --- |"]
    for step in steps:
        m = step["manifest"] or {}
        stage = step["stage"] or ("source" if step["manifest"] is None else "unknown")
        note = f" ({_text(step['error'])})" if step["error"] else ""
        out.append(f"| {_text(stage)}{note} | `{_text(step['path'])}` | {_rows(m, 'rows_in')} | {_rows(m, 'rows_out')} | {_rows(m, 'rows_rejected')} |")
    out.append("")

    models, prompts, sampling = [], [], []
    for step in steps:
        m = step["manifest"]
        if not m:
            continue
        provenance = m.get("provenance") if isinstance(m.get("provenance"), dict) else {}
        for name, values in provenance.items():
            values = values if isinstance(values, list) else [values]
            shown = ", ".join(_text(v) for v in values if v is not None)
            if name == "prompt":
                prompts.append(f"- {_text(m.get('stage'))}: {shown}")
            elif name != "random_weights" and shown:
                models.append(f"- {_text(m.get('stage'))}: {_text(name)} = {shown}")
        settings, chosen = _ran_settings(m)
        if settings:
            models.append(f"- {_text(m.get('stage'))} settings (config section): " + ", ".join(f"{k}={_text(v)}" for k, v in settings.items()))
        if chosen:
            sampling.append(f"- {_text(m.get('stage'))}: " + ", ".join(f"{k}={_text(v)}" for k, v in chosen.items()))
    out += ["## Models (with revisions)", "", *(models or ["- none recorded"]), ""]
    out += ["## Prompts (with hashes)", "", *(prompts or ["- none recorded"]), ""]
    out += ["## Sampling", "", *(sampling or ["- none recorded"]), ""]

    counters = manifest.get("counters") if isinstance(manifest.get("counters"), dict) else {}
    reasons = {k.removeprefix("rejected_"): v for k, v in counters.items() if k.startswith("rejected_")}
    out += ["## Counts and reject reasons", ""]
    out += [f"- rejected `{_text(reason)}`: {_text(count)}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1] if isinstance(kv[1], int) else 0)] or ["- no rejects recorded"]
    others = {k: v for k, v in counters.items() if not k.startswith("rejected_")}
    out += [f"- {_text(name)}: {_text(count)}" for name, count in others.items()]
    out += ["", "Every rejected row is in `_rejects/` with its reason and a detail.", ""]
    out += ["## Opening it", "", "The rows are the Parquet shards in `train/`: `datasets.load_dataset(\"parquet\", data_dir=...)` on this folder gives them as the `train` split. "
            "The rejects, with their reasons: `datasets.Dataset(pyarrow.parquet.read_table(\"_rejects\"))` in this folder, 0 rows when nothing was rejected "
            "(`load_dataset` on `_rejects/` fails then: its files hold no row).", ""]

    out += ["## Audit", ""]
    audit = manifest.get("audit")
    out += [f"```json\n{json.dumps(audit, indent=2, default=str)}\n```" if audit else "No hand audit is recorded for this dataset (`fgdata audit` writes one into the manifest)."]
    out.append("")

    out += ["## Known limitations", ""]
    out += [f"- {line}" for line in _LIMITATIONS.get(kind, ["No kind-specific notes."])]
    if any(s["kind"] == "images" for s in steps):  # every dataset made from images inherits what was done to them
        out += [f"- {line}" for line in image_curation(steps)]
    if randoms:
        out.append("- Random-weight models made part of it: captions, boxes, negatives or scores from them are noise.")
    if any(s["error"] for s in steps):
        out.append("- Part of the lineage could not be read (see the table above): what those steps did is unknown.")
    out.append("")
    return "\n".join(out)


def write_datacard(out_dir: Path, manifest: dict) -> Path:
    """Writes OUT/DATACARD.md whole (a temporary file renamed), so a reader never sees half a card."""
    path = location(out_dir) / DATACARD_FILE
    write_text_atomic(path, render_datacard(location(out_dir), manifest))
    return path


def write_text_atomic(path: Path, text: str, make_parents: bool = False) -> None:
    """shards.write_text (a temporary file named as fgdata names them, so --overwrite knows a
    leftover one as its own), into a folder that must exist unless `make_parents` (a store has no
    folders to make); a failure is a one-line error."""
    try:
        write_text(path, text, make_parents=make_parents)
    except OSError as exc:
        raise FgdataError(f"cannot write {path}: {first_line(exc)}") from None


def export_datacard(dataset_dir: Path, note: str) -> str:
    """The card an export ships: the dataset's own DATACARD.md (rendered from its manifest when an
    older run wrote none) under a line saying what the export holds."""
    dataset_dir = location(dataset_dir)  # a local path or a URI
    card = dataset_dir / DATACARD_FILE
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
    else:
        manifest = read_json(dataset_dir / MANIFEST_FILE)
        text = render_datacard(dataset_dir, manifest) if manifest is not None else f"# Data card: {_text(dataset_dir.name)}\n\nNo manifest: provenance unknown.\n"
    return f"> {_text(note)}\n\n{text}"
