import time

import pytest

from pipeline.datasets.chains import chain_nli_problem, chain_shape_problem, complete_chain, entailment_pairs, split_tiers

GOAT = ["animal", "goat", "goat on an island", "a white goat standing on a rocky island"]


def read_answer(text: str, caption: str = GOAT[-1]) -> tuple[list[str], str | None]:
    """An answer as seed/augment/generate read it (the caption last): the chain, or the reason
    (its detail aside) it is not one."""
    chain, problem = complete_chain(text, caption)
    return chain, problem[0] if problem else None


@pytest.mark.parametrize(
    "text, expected, reason",
    [
        ("animal => goat => goat on an island => a white goat standing on a rocky island", GOAT, None),
        ("Here is the hierarchy: animal => goat => goat on an island => a white goat standing on a rocky island", GOAT, None),
        ("animal -> goat -> goat on an island -> a white goat standing on a rocky island", GOAT, None),
        ("1. animal\n2. goat\n3. goat on an island\n4. a white goat standing on a rocky island", GOAT, None),
        ("Tier 1: animal\nTier 2: goat\nTier 3: goat on an island\nTier 4: a white goat standing on a rocky island", GOAT, None),
        ('["animal", "goat", "goat on an island", "a white goat standing on a rocky island"]', GOAT, None),
        ("animal => goat => goat on an island => goat => a goat", [], "wrong_tier_count"),
        ("animal =>  => goat on an island => a white goat standing on a rocky island", [], "blank_tier"),
        ("animal => goat => goat => a white goat standing on a rocky island", [], "repeated_tier"),
        ("animal => Goat =>  goat  => a white goat standing on a rocky island", [], "repeated_tier"),  # case and spacing
        # prose in a generic tier: 12 words over the 1 of the next (the official data: at most 4 over)
        ("animal, the most general category that a goat belongs to => goat => goat on an island => a white goat standing on a rocky island", [], "tier_too_long"),
        ("", [], "empty_output"),
        ("I cannot help with that request.", [], "unparseable"),
    ],
)
def test_messy_chains(text, expected, reason):
    assert read_answer(text) == (expected, reason)  # all four tiers written, the caption last


def test_a_chain_short_of_a_tier_is_refused():
    text = "animal => goat => a white goat standing on a rocky island"
    tiers, problem = split_tiers(text)
    assert problem is None and chain_shape_problem(tiers)[0] == "wrong_tier_count"
    # read as the tiers above the caption, the caption stands twice
    assert read_answer(text) == ([], "repeated_tier")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("[" * 100_000, "too_long"),
        ("[" * 5_000 + "]" * 5_000, "unparseable"),  # was RecursionError
        ('["animal", ' + "7" * 5_000 + "]", "unparseable"),  # was ValueError (int of 4,300+ digits)
        ("x" + "\n" * 31_000 + "x", "unparseable"),  # the multi-line regexes took 15 s
        ("1. " + " " * 16_000 + "animal", "unparseable"),
        ("animal" + " " * 30_000 + "=> goat", "wrong_tier_count"),
    ],
    ids=["100k brackets", "deep brackets", "huge integer", "31k newlines", "16k spaces", "30k spaces by an arrow"],
)
def test_hostile_chains_give_a_reason_fast(text, reason):
    start = time.perf_counter()
    assert read_answer(text) == ([], reason)
    assert time.perf_counter() - start < 1.0


def test_a_chain_after_a_long_run_of_blank_lines_is_still_read():
    assert read_answer("\n" * 16_000 + " => ".join(GOAT)) == (GOAT, None)


def test_a_reversed_chain_passes_the_shape_rule_and_fails_nli():
    # fewer words is not less specific (`baked goods => cake`), so word counts cannot tell the
    # order; the NLI filter does: "goat on an island" does not entail "a white goat ..."
    reversed_goat = GOAT[::-1]
    assert read_answer(" => ".join(reversed_goat), reversed_goat[-1]) == (reversed_goat, None)
    assert chain_nli_problem(reversed_goat, [0.08, 0.3, 0.2], threshold=0.5) == (
        "not_entailed", "tier 2 ('goat on an island') entails tier 1 ('a white goat standing on a rocky island') with only 0.08 < 0.5"
    )


def test_nli_filter_reports_the_failing_tier():
    assert entailment_pairs(GOAT)[0] == ("goat", "animal")
    assert chain_nli_problem(GOAT, [0.97, 0.91, 0.88], threshold=0.5) is None
    # "goat on an island" does not entail "goat"
    assert chain_nli_problem(GOAT, [0.97, 0.21, 0.12], threshold=0.5) == (
        "not_entailed", "tier 3 ('goat on an island') entails tier 2 ('goat') with only 0.21 < 0.5"
    )
    assert chain_shape_problem(GOAT) is None


TRAIN_CSV = (
    "positive,negative\n"
    "animal => goat => goat on an island => a white goat standing on a rocky island,"
    "animal => sheep => sheep on an island => a black sheep standing on a rocky island\n"
    "vehicle => motorcycle => red motorcycle => a red motorcycle parked in a garage,"
    "vehicle => car => red car => a red car parked in a garage\n"
    "thing => thing,broken => row\n"
)
TEST_CSV = (
    "id,captions,image_url\n"
    "17,animal => dog => dog on a sofa => a brown dog sleeping on a sofa,http://example.com/17.jpg\n"
    "18,food => fruit => sliced fruit => sliced oranges on a plate,\n"
)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("layout, text", [("train", TRAIN_CSV), ("test", TEST_CSV)])
def test_official_layouts_round_trip(layout, text, tmp_path):
    from conftest import assert_dataset_invariants, make_config, read_rows

    from pipeline.core.shards import read_rejects
    from pipeline.datasets.hierarcaps_csv import write_official_csv
    from pipeline.runner import run_stage
    from pipeline.stages.hierarcaps.import_csv import HierarcapsImportStage

    source = tmp_path / f"{layout}.csv"
    source.write_text(text)
    first = tmp_path / "first"
    run_stage(HierarcapsImportStage(source), first, make_config())
    assert_dataset_invariants(first)
    rows = read_rows(first)
    if layout == "train":
        assert [r["key"] for r in read_rejects(first).to_pylist()] == ["train-0000002"]
        assert rows[0]["negative_tiers"][1] == "sheep" and rows[1]["tiers"][-1] == "a red motorcycle parked in a garage"
    else:
        assert rows[0]["key"] == "17" and rows[0]["image_url"] == "http://example.com/17.jpg" and rows[1]["image_url"] is None
    exported = tmp_path / "exported.csv"
    write_official_csv(first, exported, layout)
    second = tmp_path / "second"
    run_stage(HierarcapsImportStage(exported), second, make_config())
    strip = lambda rs: [{k: v for k, v in r.items() if k != "source"} for r in rs]  # noqa: E731
    assert strip(read_rows(second)) == strip(rows)


def test_unknown_csv_layout_is_a_clear_error(tmp_path):
    from pipeline.datasets.hierarcaps_csv import read_official_csv
    from pipeline.errors import FgdataError

    bad = tmp_path / "x.csv"
    bad.write_text("caption,url\na,b\n")
    with pytest.raises(FgdataError, match="match neither HierarCaps layout"):
        read_official_csv(bad)


@pytest.mark.usefixtures("ray_session")
def test_nli_filter_stage_keeps_or_rejects_whole_chains(tmp_path):
    from conftest import SAMPLE_IMAGES, assert_dataset_invariants, make_config, read_rows

    from pipeline.core.shards import read_rejects
    from pipeline.models.tiny import build_tiny_nli
    from pipeline.runner import run_stage
    from pipeline.stages.hierarcaps.filter import HierarcapsFilterStage
    from pipeline.stages.hierarcaps.import_csv import HierarcapsImportStage

    nli = build_tiny_nli(tmp_path / "nli", [p.read_text() for p in SAMPLE_IMAGES.glob("*.txt")] * 10)
    (tmp_path / "test.csv").write_text(TEST_CSV)
    run_stage(HierarcapsImportStage(tmp_path / "test.csv"), tmp_path / "imported", make_config())
    # a random NLI model gives every pair about 1/3: a floor of 0 keeps all, 0.99 rejects all
    run_stage(HierarcapsFilterStage(tmp_path / "imported"), tmp_path / "kept", make_config(f"hierarcaps.nli_model={nli}", "hierarcaps.min_entailment=0"))
    kept = read_rows(tmp_path / "kept")
    assert [r["key"] for r in kept] == ["17", "18"] and all(len(r["entailment"]) == 3 for r in kept)
    run_stage(HierarcapsFilterStage(tmp_path / "imported"), tmp_path / "none", make_config(f"hierarcaps.nli_model={nli}", "hierarcaps.min_entailment=0.99"))
    assert_dataset_invariants(tmp_path / "none", expected_keys={"17", "18"})
    rejects = read_rejects(tmp_path / "none").to_pylist()
    assert {r["reason"] for r in rejects} == {"not_entailed"}
    assert rejects[0]["detail"].startswith("tier 2 ('dog') entails tier 1 ('animal') with only")
