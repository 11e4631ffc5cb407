"""Prompt templates are filled in one pass: text from the data never becomes part of the template."""

from __future__ import annotations

from pipeline.core.prompts import fill_template, load_prompt

HOSTILE = "a {phrase} {examples} {count} {caption}"


def test_placeholders_inside_values_stay_verbatim():
    template = "Caption: {caption}\nPhrase: {phrase}\nWrite {count}.\n{examples}"
    filled = fill_template(template, {"caption": HOSTILE, "phrase": "a red cup", "count": "10", "examples": "E"})
    assert filled == f"Caption: {HOSTILE}\nPhrase: a red cup\nWrite 10.\nE"


def test_every_placeholder_is_filled_exactly_once():
    template = "{count} {caption} {count} {phrase}"
    filled = fill_template(template, {"count": "[C]", "caption": "{count}", "phrase": "{caption}"})
    assert filled == "[C] {count} [C] {caption}"


def test_other_braces_are_left_alone():
    assert fill_template('{"negative": "..."} {unknown} {phrase}', {"phrase": "p"}) == '{"negative": "..."} {unknown} p'


def test_negatives_prompt_keeps_a_hostile_caption_and_phrase_verbatim():
    from pipeline.stages.fggrn.negatives import fill_prompt

    template = load_prompt("hard_negatives.v1").text
    filled = fill_prompt(template, 10, HOSTILE, "{caption} {count}")
    assert filled.endswith(f"Caption: {HOSTILE}\nPhrase: {{caption}} {{count}}") and "write 10 new phrases" in filled
    # the template's own placeholders are all filled: what braces remain came from the data
    assert filled.count("{count}") == 2 and filled.count("{caption}") == 2 and filled.count("{phrase}") == 1


def test_hierarcaps_prompts_keep_a_hostile_caption_verbatim(tmp_path):
    from pipeline.stages.hierarcaps.seed import HierarcapsSeedStage

    settings = type("Settings", (), {"demonstrations": 2, "seed": 0})()
    template = load_prompt("hierarcaps_seed.v1").text
    filled = HierarcapsSeedStage(tmp_path)._fill(template, {"key": "k", "caption": f"  {HOSTILE} "}, settings)
    before, _, after = template.partition("{caption}")
    assert filled == before + HOSTILE + after

    from pipeline.stages.hierarcaps.augment import HierarcapsAugmentStage

    augment = HierarcapsAugmentStage(tmp_path, tmp_path)
    augment.examples = [["animal", "dog", "dog on grass", "a dog on the grass {examples}"]]
    filled = augment._fill(load_prompt("hierarcaps_augment.v1").text, {"key": "k", "caption": HOSTILE}, settings)
    assert filled.count(HOSTILE) == 1 and filled.count("a dog on the grass {examples}") == 1
    # {examples} in the template filled once; the caption and the example keep theirs
    assert filled.count("{examples}") == 2
