"""Issue 21, phrases: hostile captions through the stage end as rows with only real, present,
bounded phrases, or as rejects with a reason. Negation, other languages in Latin letters,
fullwidth English, markup residue (URL, script, ANSI, markdown, escaped entities), 65-word chunks."""

import time
from collections import Counter

import pytest
from conftest import assert_dataset_invariants, make_config, read_rows, write_caption_shard

from pipeline.core.shards import read_json, read_rejects
from pipeline.core.text import clean_caption
from pipeline.runner import run_stage
from pipeline.stages.fggrn.phrases import PhrasesStage

_ADJECTIVES = (
    "big small old new shiny rusty dusty clean dirty bright dark pale heavy long short tall wide narrow smooth "
    "rough soft hard warm cold wet dry empty full broken cheap fancy plain simple modern ancient tiny huge round "
    "square flat thick thin loud quiet fast slow strong weak sharp dull fresh stale sweet sour rich poor proud "
    "brave calm eager gentle happy jolly kind"
).split()[:63]

# key -> (caption, phrases expected, or the reject reason expected)
CASES = {
    "neg_list": ("no people on the street, a table without chairs, not a red car", ["the street", "a table"]),
    "neg_there_is_no": ("There is no dog in the room.", ["the room"]),
    "neg_isnt": ("There isn't a car on the road.", ["the road"]),
    "neg_neither_nor": ("Neither a cat nor a dog is visible.", []),
    "neg_free_of": ("A room free of furniture with a red sofa.", ["A room", "a red sofa"]),
    "neg_not_wearing": ("A man not wearing a hat stands next to a bike.", ["A man", "a bike"]),
    "german": ("Ein Auto steht neben einem großen Baum", "not_english"),
    "german_an": ("Ein Mann mit einem Hut steht an der Tür", "not_english"),
    "french": ("Une femme avec un chapeau rouge est assise sur un banc", "not_english"),
    "spanish": ("Una mujer camina a la playa con su perro", "not_english"),
    "fullwidth": ("ａ ｒｅｄ ｃａｒ ｏｎ ａ ｒｏａｄ", ["a red car", "a road"]),
    "url": ("A dog https://example.com/very/long/path?x=1&y=2 runs on a beach", ["A dog", "a beach"]),
    "url_only": ("https://example.com/images/0001.jpg", "empty_caption"),
    "script": ("A cat <script>alert(1)</script> sleeps on a sofa", ["A cat", "a sofa"]),
    "ansi": ("a car with \x1b[31mred\x1b[0m paint", ["a car with red paint", "red paint"]),
    "markdown": ("![img](http://x.example/a.png) A **brown** dog next to a [red ball](https://b.example/ball)", None),
    "double_escaped": ("a &amp;lt;i&amp;gt;red&amp;lt;/i&amp;gt; car", ["a red car"]),
    # a run-on chunk inside English prose (alone, 3 function words in 69 would read as not English)
    "long_chunk": (
        f"a {' '.join(_ADJECTIVES)} car is parked on a street, and there is a tree in the yard behind it and a bench near the house.",
        None,
    ),
}
RESIDUE = ("http", "www", "://", "](", "[", "*", "<", ">", "&", "alert", "\x1b", "script")


@pytest.mark.usefixtures("ray_session")
def test_hostile_captions_give_clean_rows_or_reasoned_rejects(tmp_path, capsys):
    source = tmp_path / "captions"
    write_caption_shard(source / "part-00000.parquet", [{"key": k, "short_caption": c} for k, (c, _) in CASES.items()])
    out = tmp_path / "phrases"
    started = time.perf_counter()
    summary = run_stage(PhrasesStage(source), out, make_config())
    seconds = time.perf_counter() - started

    assert summary.rows_in == len(CASES) == summary.rows_out + summary.rows_rejected
    assert_dataset_invariants(out, set(CASES))
    rejects = {r["key"]: r for r in read_rejects(out).to_pylist()}
    rows = {r["key"]: r for r in read_rows(out)}
    for key, (_, expected) in CASES.items():
        if isinstance(expected, str):
            assert rejects[key]["reason"] == expected and rejects[key]["detail"], key
        else:
            assert key in rows, (key, rejects.get(key))
            if expected is not None:
                assert [p["text"] for p in rows[key]["phrases"]] == expected, key

    for row in rows.values():
        assert clean_caption(row["short_caption"]) == row["short_caption"]  # cleaned once, and for good
        for phrase in row["phrases"]:
            assert row["short_caption"][phrase["start"] : phrase["end"]] == phrase["text"]
            assert not any(mark in phrase["text"] for mark in RESIDUE), (row["key"], phrase["text"])
            assert len(phrase["text"].split()) <= 24, (row["key"], phrase["text"])
    heads = {p["head"] for key in rows if key.startswith("neg_") for p in rows[key]["phrases"]}
    assert not heads & {"people", "chair", "car", "dog", "cat", "furniture", "hat"}  # absent things stay out
    assert rows["fullwidth"]["short_caption"] == "a red car on a road"
    assert rows["double_escaped"]["short_caption"] == "a red car"
    assert [p["text"] for p in rows["markdown"]["phrases"]][-2:] == ["A brown dog", "a red ball"]
    car = next(p for p in rows["long_chunk"]["phrases"] if p["head"] == "car")
    assert car["text"].endswith(f"{_ADJECTIVES[-1]} car")

    counters = read_json(out / "_manifest.json")["counters"]
    assert counters["phrases_truncated"] == 1
    assert counters["phrases_negated"] >= 9  # people, chairs, red car, dog, car, cat, dog, furniture, hat
    by_reason = Counter(r["reason"] for r in rejects.values())
    with capsys.disabled():
        print(
            f"\nphrases hostile: {len(CASES)} inputs, {len(rows)} rows, rejects {dict(by_reason)}, "
            f"{counters['phrases_negated']} negated phrases dropped, {counters['phrases_truncated']} truncated, {seconds:.1f} s"
        )
