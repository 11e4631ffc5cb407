"""HierarCaps chain rules against chains shaped like the official data (issue 19).

Real hierarchies do not grow word by word: the official TAU-VAILab/hierarcaps files have
`baked goods => cake`, `heat source => stove`, tier-3 phrases longer than the caption, and
tiers that differ by punctuation only. The old word-count rule rejected 185 of the 1,000 test
chains and 4,752 of the 23,479 expanded ones. The rows here are written in the official layouts
by the test itself (the data has no licence and is not shipped).
"""

from __future__ import annotations

import gzip
from collections import Counter

import pytest

from pipeline.datasets.chains import SEPARATOR, chain_shape_problem, complete_chain
from pipeline.datasets.hierarcaps_csv import read_chains, read_official_csv
from pipeline.errors import FgdataError

# Chains in the style of the official files, each of which the old rule (no tier may have fewer
# words than the one above it) rejected.
SHORTER_BELOW = [
    ["baked goods", "cake", "a cake with candles on a table", "A birthday cake with lit candles sits on a wooden table."],
    ["heat source", "stove", "stove in a kitchen", "A white stove in a small kitchen next to a sink."],
    ["facial expression", "smile", "a woman with a smile", "A smiling woman holding an umbrella in the rain."],
    ["type of place of retail", "store", "man walking in front of a store .", "A person walking by a shop with umbrellas in the window."],
    ["large body of water", "beach", "a man and woman stand on the beach with water at the shore", "A man and woman stand on the beach and look at the ocean."],
    ["wood", "wooden boards", "a set of angled wooden boards for the wood , a group of people using tools", "Several pieces of wood lined up near a lot with several axes around."],
]
# tiers that differ by punctuation only (56 official chains): not a repeated tier
PUNCTUATION_ONLY = ["riders", "riders in their gear", "riders in their gear .", "Bikers, dressed in their gear, standing near their motorcycles."]
REAL = [*SHORTER_BELOW, PUNCTUATION_ONLY]


def _old_rule_rejects(tiers: list[str]) -> bool:
    words = [len(tier.split()) for tier in tiers]
    return any(later < earlier for earlier, later in zip(words, words[1:]))


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"') else text


def test_these_chains_are_the_ones_the_old_rule_rejected():
    assert all(_old_rule_rejects(tiers) for tiers in SHORTER_BELOW)


def test_official_test_layout_keeps_real_chains_through_import_and_read_chains(tmp_path):
    # the reference's test layout: id,captions,image_url, tiers joined by " => "
    path = tmp_path / "hierarcaps_test.csv"
    lines = ["id,captions,image_url"] + [
        f"{i},{_csv_field(SEPARATOR.join(tiers))},http://images.cocodataset.org/val2014/COCO_val2014_{i:012d}.jpg" for i, tiers in enumerate(REAL)
    ]
    path.write_text("\n".join(lines) + "\n")
    layout, rows, rejects = read_official_csv(path)
    assert layout == "test" and rejects == [] and [r["tiers"] for r in rows] == REAL
    counts = Counter()
    chains = read_chains([path], counts=counts)
    assert [tiers for _, tiers, _ in chains] == REAL and counts == Counter()


def test_official_train_layout_gzipped_keeps_real_chains(tmp_path):
    negative = "plant => flower => flower in a vase => a red flower standing in a vase"
    path = tmp_path / "hierarcaps_train.csv.gz"
    text = "positive,negative\n" + "".join(f"{_csv_field(SEPARATOR.join(tiers))},{negative}\n" for tiers in REAL)
    path.write_bytes(gzip.compress(text.encode()))
    counts = Counter()
    chains = read_chains([path], need_negatives=True, counts=counts)
    assert [tiers for _, tiers, _ in chains] == REAL and counts == Counter()


@pytest.mark.parametrize("tiers", REAL, ids=[tiers[1] for tiers in REAL])
def test_the_generated_chain_rule_keeps_real_hierarchies(tiers):
    assert chain_shape_problem(tiers) is None
    assert chain_shape_problem(tiers, caption=tiers[-1]) is None
    # as seed/augment/generate read a model's answer: the three tiers above, the caption last
    assert complete_chain(SEPARATOR.join(tiers[:3]), tiers[-1]) == (tiers, None)
    assert complete_chain(SEPARATOR.join(tiers), tiers[-1]) == (tiers, None)


CAPTION = "A birthday cake with lit candles sits on a wooden table."


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("", "empty_output"),
        ("   \n ", "empty_output"),
        ("I'm sorry, I can't help with that.", "unparseable"),
        ("baked goods => cake => cake", "repeated_tier"),
        ("baked goods => Cake =>  cake ", "repeated_tier"),  # case and spacing do not make a new tier
        ("food => cake => " + CAPTION.lower(), "repeated_tier"),  # the caption again, above itself
        ("baked goods => cake", "wrong_tier_count"),
        ("baked goods => cake => birthday cake => a cake on a plate", "wrong_tier_count"),  # a 4th tier that is not the caption
        ("baked goods =>  => birthday cake", "blank_tier"),
        # prose in a generic tier: 14 words over the next one's 1
        ("baked goods, which is the broad category this image belongs to as a whole => cake => birthday cake", "tier_too_long"),
    ],
)
def test_bad_generated_chains_are_rejected_with_their_reason(answer, reason):
    chain, (problem, detail) = complete_chain(answer, CAPTION)
    assert chain == [] and problem == reason and detail.startswith(f"model answered {answer!r}")


def test_a_chain_whose_last_tier_is_not_the_caption_is_rejected():
    tiers = ["baked goods", "cake", "birthday cake", "a cake on a plate"]
    assert chain_shape_problem(tiers) is None
    assert chain_shape_problem(tiers, caption=CAPTION) == ("last_tier_not_caption", "the last tier 'a cake on a plate' is not the caption")
    assert chain_shape_problem(tiers, caption=" A CAKE on a  plate") is None  # case and spacing only


def test_read_chains_counts_every_dropped_chain_by_reason(tmp_path):
    negative = "plant => flower => flower in a vase => a red flower standing in a vase"
    good = SEPARATOR.join(REAL[0])
    path = tmp_path / "hierarcaps_train.csv"
    path.write_text(
        "positive,negative\n"
        f"{good},{negative}\n"
        f"{good}\n"  # one field: wrong_field_count
        f"baked goods => cake,{negative}\n"  # wrong_tier_count
        f"baked goods =>  => cake => a cake,{negative}\n"  # blank_tier
        f"{SEPARATOR.join(REAL[1])},\n"  # a chain without a negative
        f"{SEPARATOR.join(REAL[2])},\n"
    )
    counts = Counter()
    assert len(read_chains([path], counts=counts)) == 3
    assert counts == {"skipped_wrong_field_count": 1, "skipped_wrong_tier_count": 1, "skipped_blank_tier": 1}
    counts = Counter()
    assert [tiers for _, tiers, _ in read_chains([path], need_negatives=True, counts=counts)] == [REAL[0]]
    assert counts == {"skipped_wrong_field_count": 1, "skipped_wrong_tier_count": 1, "skipped_blank_tier": 1, "skipped_no_negative_chain": 2}
    # the old call, without counts, still works and still drops them
    assert len(read_chains([path], need_negatives=True)) == 1


def test_no_usable_chain_names_the_reasons(tmp_path):
    path = tmp_path / "hierarcaps_train.csv"
    path.write_text(f"positive,negative\nbaked goods => cake,\n{SEPARATOR.join(REAL[0])},\n")
    with pytest.raises(FgdataError, match=r"no usable chains in .*\(skipped_no_negative_chain 1, skipped_wrong_tier_count 1\)"):
        read_chains([path], need_negatives=True)


def test_distill_report_records_the_dropped_chains(tmp_path):
    from pipeline.config import DistillConfig
    from pipeline.models.tiny import build_tiny_t5
    from pipeline.train.distill import distill, distillation_pairs

    path = tmp_path / "hierarcaps_train.csv"
    rows = [f"{_csv_field(SEPARATOR.join(tiers))}," for tiers in REAL] + ["baked goods => cake,", "a => b => c,"]
    path.write_text("positive,negative\n" + "\n".join(rows) + "\n")
    texts = [text for tiers in REAL for pair in distillation_pairs(tiers) for text in pair]
    base = build_tiny_t5(tmp_path / "t5", texts)
    settings = DistillConfig(base_model=str(base), max_steps=1, batch_size=4, eval_every=1, save_every=10_000, eval_fraction=0.0)
    report = distill([path], tmp_path / "distilled", settings, progress=False)
    assert report["chains"]["train"] == len(REAL)
    assert report["chains_dropped"] == {"skipped_wrong_tier_count": 2}


def test_train_re_counts_and_says_how_many_chains_it_used_and_left_out(tmp_path, caplog):
    import logging

    from conftest import make_config

    from pipeline.models.tiny import build_tiny_clip
    from pipeline.train.objectives import RadialObjective

    negative = "plant => flower => flower in a vase => a red flower standing in a vase"
    path = tmp_path / "hierarcaps_train.csv.gz"
    rows = [f"{_csv_field(SEPARATOR.join(tiers))},{negative}" for tiers in REAL]
    rows += [f"{SEPARATOR.join(REAL[0])},", f"baked goods => cake,{negative}", f"{SEPARATOR.join(REAL[1])}"]
    path.write_bytes(gzip.compress(("positive,negative\n" + "\n".join(rows) + "\n").encode()))
    clip = build_tiny_clip(tmp_path / "clip", [text for tiers in REAL for text in tiers] + negative.split(" => "))
    settings = make_config(f"radial.model={clip}").radial
    with caplog.at_level(logging.INFO, logger="pipeline.train.objectives"):
        objective = RadialObjective([path], settings, images=None, device="cpu")
    assert len(objective.chains) == len(REAL)
    # the manifest's `data` (train.json): every row of the file is used or counted by reason
    assert objective.data == {
        "rows": len(REAL) + 3, "rows_usable": len(REAL),
        "skipped_no_negative_chain": 1, "skipped_wrong_tier_count": 1, "skipped_wrong_field_count": 1,
    }
    assert f"re data: {len(REAL)} chains used, 3 left out (skipped_no_negative_chain 1, skipped_wrong_field_count 1, skipped_wrong_tier_count 1)" in caplog.text
