"""`fgdata phrases`: spaCy splits each caption into referring expressions, one row per image."""

from __future__ import annotations

from collections import Counter
from functools import cache
from pathlib import Path

import pyarrow as pa

from pipeline.config import Config, PhrasesConfig
from pipeline.core.caption_quality import caption_words, english_fraction
from pipeline.core.schemas import check_input_columns, conform
from pipeline.core.shards import lineage_entry, read_shard, read_shard_schema
from pipeline.core.storage import resolved
from pipeline.core.text import clean_caption, latin_fraction
from pipeline.models.spacy_nlp import load_spacy, spacy_id
from pipeline.stages.base import ShardResult, Stage, WorkUnit, reject
from pipeline.stages.fggrn.expressions import ExpressionRules, extract_expressions

REQUIRED_COLUMNS = {"key": pa.string(), "short_caption": pa.string()}
OPTIONAL_COLUMNS = {"long_caption": pa.string()}
# Function words of other languages written in Latin letters that are not English words as well
# (so "a", "in", "an", "die", "no" are absent): German, French, Spanish, Italian, Portuguese, Dutch.
# Latin letters alone let "Ein Auto steht neben einem großen Baum" through as English.
OTHER_LANGUAGE_FUNCTION_WORDS = frozenset(
    "der das und ein eine einem einen einer eines dem mit auf neben ist sind nicht von vor zum zur bei aus "
    "über unter sich im "
    "le les un une des du et sur avec est dans sous au aux cette ses sont près devant derrière "
    "el los las una unos unas con en del es está están sobre junto su sus al por para que "
    "il lo gli della delle dello di sul sulla nel nella che "
    "um uma com em da dos das na ao os é "
    "een het op naast bij".split()
)


def rules_from(config: PhrasesConfig) -> ExpressionRules:
    return ExpressionRules(
        abstract_heads=frozenset(h.lower() for h in config.abstract_heads),
        quantifier_heads=frozenset(h.lower() for h in config.quantifier_heads),
        attribute_preps=frozenset(p.lower() for p in config.attribute_preps),
        drop_entity_types=frozenset(config.drop_entity_types),
        max_words=config.max_phrase_words,
        worn_preps=frozenset(p.lower() for p in config.worn_preps),
        part_preps=frozenset(p.lower() for p in config.part_preps),
        worn_heads=frozenset(h.lower() for h in config.worn_heads),
        part_heads=frozenset(h.lower() for h in config.part_heads),
        verb_lemmas=_lemma_index(config.spacy_model, "verb"),
        noun_lemmas=_lemma_index(config.spacy_model, "noun"),
    )


@cache
def _lemma_index(name: str, pos: str) -> frozenset[str]:
    """Words the pipeline's rule lemmatizer lists under `pos` (WordNet's verb and noun indexes in
    en_core_web_*); empty when the pipeline has no such table, which turns the guards that need it
    off (verbs tagged as nouns, nouns tagged as verbs)."""
    try:
        lookups = load_spacy(name).get_pipe("lemmatizer").lookups
        return frozenset(lookups.get_table("lemma_index")[pos])
    except (KeyError, AttributeError, ValueError):
        return frozenset()


class PhrasesStage(Stage):
    name = "phrases"
    output_kind = "phrases"
    config_section = "phrases"

    def __init__(self, input_dir: Path):
        self.input_dir = resolved(input_dir)  # a local path or a URI

    def plan(self, config: Config) -> list[WorkUnit]:
        return self.plan_each_shard(self.input_dir, config)

    def check(self, config: Config) -> None:
        load_spacy(config.phrases.spacy_model)  # a missing pipeline stops the run before it starts

    def plan_shard(self, path: Path, config: Config) -> WorkUnit:
        schema = read_shard_schema(path)
        check_input_columns(schema, REQUIRED_COLUMNS, where=str(path))
        present = [n for n in OPTIONAL_COLUMNS if n in schema.names]
        check_input_columns(schema, {n: OPTIONAL_COLUMNS[n] for n in present}, where=str(path))
        return WorkUnit(path.name, {"path": str(path), "columns": [*REQUIRED_COLUMNS, *present]})

    def lineage(self) -> list[dict]:
        return [lineage_entry(self.input_dir)]

    def process(self, unit: WorkUnit, config: Config, model=None, prepared=None) -> ShardResult:
        settings = config.phrases
        source_path = unit.payload["path"]
        table = read_shard(source_path, columns=unit.payload["columns"])
        nlp = load_spacy(settings.spacy_model)
        model_id = spacy_id(nlp)
        rows, rejects, texts = [], [], []
        counters: Counter = Counter()
        seen: set[str] = set()
        for index, record in enumerate(table.to_pylist()):
            key = record["key"]
            # Idempotent, so text that ingest already cleaned passes unchanged (pipeline/core/text.py);
            # long captions from recaption or a user's shards are cleaned here for the first time.
            short, long = clean_caption(record["short_caption"]), clean_caption(record.get("long_caption"))
            source_column, text = ("long_caption", long) if long else ("short_caption", short)
            problem = _caption_problem(key, seen, text, settings)
            if problem:
                rejects.append(reject(key if key is not None else f"<row {index}>", problem, source_path))
                continue
            seen.add(key)
            texts.append(text)
            rows.append({"key": key, "short_caption": short or None, "long_caption": long or None, "phrase_source": source_column})
        rules = rules_from(settings)
        for row, doc in zip(rows, nlp.pipe(texts, batch_size=settings.batch_size)):
            row["phrases"] = extract_expressions(doc, rules, counters)
            row["spacy_model"] = model_id
            counters["phrases"] += len(row["phrases"])
            counters["rows_without_phrases"] += not row["phrases"]
        return ShardResult(
            rows_in=table.num_rows,
            table=conform(rows, "phrases"),
            rejects=rejects,
            counters=counters,
            provenance={"spacy_model": model_id},
        )


def _caption_problem(key, seen: set[str], text: str | None, settings: PhrasesConfig) -> tuple[str, str] | None:
    if key is None:
        return "missing_key", "the row has no key"
    if key in seen:
        return "duplicate_key", f"key {key!r} appears more than once in the shard"
    if not text:
        return "empty_caption", "neither long_caption nor short_caption has any text"
    if len(text) > settings.max_caption_chars:
        return "caption_too_long", f"{len(text)} characters, over phrases.max_caption_chars={settings.max_caption_chars}"
    fraction = latin_fraction(text)
    if fraction < settings.min_latin_fraction:
        return "not_english", f"only {fraction:.0%} of the letters are Latin script; the spaCy pipeline is English"
    return _not_english_by_words(text, settings)


def _not_english_by_words(text: str, settings: PhrasesConfig) -> tuple[str, str] | None:
    """Latin letters, but which language: English function words must be common enough (the check
    recaption applies, for captions long enough to judge: "red car" has none and is English) and
    must not be outnumbered by another language's."""
    words = caption_words(text)
    english = english_fraction(words)
    if len(words) >= settings.english_check_min_words and english < settings.min_english_fraction:
        return "not_english", (
            f"only {english:.0%} of {len(words)} words are common English function words, "
            f"under phrases.min_english_fraction={settings.min_english_fraction}; the spaCy pipeline is English"
        )
    foreign = [w for w in words if w in OTHER_LANGUAGE_FUNCTION_WORDS]
    if len(foreign) >= 2 and len(foreign) > round(english * len(words)):
        return "not_english", f"more non-English function words ({', '.join(foreign[:5])}) than English ones"
    return None
