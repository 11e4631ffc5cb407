"""FineHARD kept whole (issue 27): `fgdata import fgclip --images` then `fgdata export fgclip` gives
back the released items, field by field.

The file is FineHARD-shaped (FG-CLIP's stage-2 layout, as `train_fgclip.py` at 0fcea59 and
`train_fgclip2.py` read it): f_path under coyo folders, a long caption and a short one, boxes with
short_expr and an LLM-written long_expr (capitals, words the caption does not hold), the same phrase
boxed twice, flag_short_neg 1 with 10 negatives and 0 with none, an image whose only negatives
are beyond the 4 boxes the loaders keep, and one without any negatives. Items compare as a set
(the loaders read them all, in any order); bbox_info in order (the loaders keep the first 4)."""

from __future__ import annotations

import json

from conftest import image_bytes
from test_export_fgclip_loader import load_like_fgclip
from typer.testing import CliRunner

from pipeline.cli import app


def negatives(*texts: str) -> dict:
    return {str(i): t for i, t in enumerate(texts)}


COLOURS = ("red", "green", "yellow", "black", "white", "purple", "orange", "pink", "grey", "brown")
MAN = negatives(*(f"a man in a {c} shirt" for c in COLOURS))
DOG = negatives(*(f"a {c} dog" for c in COLOURS if c != "brown"), "a brown cat")

ITEMS = [
    {
        "f_path": "coyo_image_0/00000/000000001.jpg",
        "caption": "A man in a blue shirt walks a brown dog along a sandy beach while a person in a red jacket watches from a bench.",
        "short_caption": "man walking his dog on the beach",
        "bbox_info": [
            {"bbox": [0.1234567, 0.2, 0.45, 0.9876543], "short_expr": "a man in a blue shirt",
             "long_expr": "A man wearing a blue short-sleeved shirt and dark shorts, walking on the sand.", "flag_short_neg": 1, "short_expr_negs": MAN},
            {"bbox": [0.5, 0.6, 0.7, 0.95], "short_expr": "a brown dog", "long_expr": "A brown dog with a red collar trotting beside its owner.",
             "flag_short_neg": 1, "short_expr_negs": DOG},
            {"bbox": [0.8, 0.3, 0.9, 0.6], "short_expr": "a person", "long_expr": "A person in a red jacket sitting on a wooden bench.",
             "flag_short_neg": 0, "short_expr_negs": {}},
            {"bbox": [0.05, 0.3, 0.12, 0.55], "short_expr": "a person", "long_expr": "A second person far away, near the water line.",
             "flag_short_neg": 0, "short_expr_negs": {}},
        ],
    },
    {
        "f_path": "coyo_image_0/00000/000000002.jpg",
        "caption": "A quiet street at dusk with parked cars and lit shop windows.",
        "short_caption": "street at night",
        "bbox_info": [
            {"bbox": [0.0, 0.5, 0.3, 0.8], "short_expr": "parked cars", "long_expr": "Several cars parked along the curb.", "flag_short_neg": 0, "short_expr_negs": {}},
            {"bbox": [0.4, 0.2, 1.0, 0.6], "short_expr": "lit shop windows", "long_expr": "Brightly lit shop windows on the right.", "flag_short_neg": 0, "short_expr_negs": {}},
        ],
    },
    {
        "f_path": "coyo_image_1/00003/000300007.jpg",
        "caption": "A kitchen table holds a white plate, a glass of water, a fork, a knife and a green apple.",
        "short_caption": "breakfast table",
        "bbox_info": [
            {"bbox": [0.1, 0.1, 0.3, 0.3], "short_expr": "a white plate", "long_expr": "A round white ceramic plate.", "flag_short_neg": 0, "short_expr_negs": {}},
            {"bbox": [0.35, 0.1, 0.45, 0.4], "short_expr": "a glass of water", "long_expr": "A tall glass filled with water.", "flag_short_neg": 0, "short_expr_negs": {}},
            {"bbox": [0.5, 0.1, 0.55, 0.4], "short_expr": "a fork", "long_expr": "A silver fork lying on a napkin.", "flag_short_neg": 0, "short_expr_negs": {}},
            {"bbox": [0.6, 0.1, 0.65, 0.4], "short_expr": "a knife", "long_expr": "A butter knife.", "flag_short_neg": 0, "short_expr_negs": {}},
            {"bbox": [0.7, 0.5, 0.9, 0.7], "short_expr": "a green apple", "long_expr": "A shiny green apple at the edge of the table.",
             "flag_short_neg": 1, "short_expr_negs": negatives(*(f"a {c} apple" for c in COLOURS if c != "green"), "a green pear")},
        ],
    },
    {
        "f_path": "coyo_image_1/00003/000300011.jpg",
        "caption": "Two children fly a striped kite over a grassy hill under a cloudy sky.",
        "short_caption": "kids with a kite",
        "bbox_info": [
            {"bbox": [0.3, 0.05, 0.6, 0.35], "short_expr": "a striped kite", "long_expr": "A red and white striped kite high in the sky.",
             "flag_short_neg": 1, "short_expr_negs": negatives(*(f"a {c} kite" for c in ("dotted", "plain", "checked", "torn", "small", "huge", "square", "round", "paper", "plastic")))},
            {"bbox": [0.2, 0.5, 0.5, 1.0], "short_expr": "two children", "long_expr": "Two young children running on the grass, holding the kite string.",
             "flag_short_neg": 1, "short_expr_negs": negatives(*(f"{n} children" for n in ("three", "four", "five", "six", "seven", "one", "eight", "nine", "ten", "many")))},
        ],
    },
]


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def write_finehard(folder) -> dict[str, bytes]:
    """The JSON and one distinct JPEG per item; the image bytes by f_path."""
    images = {}
    for number, item in enumerate(ITEMS):
        data = image_bytes((64 + 8 * number, 48), color=(40 * number, 200 - 30 * number, 90))
        (folder / item["f_path"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / item["f_path"]).write_bytes(data)
        images[item["f_path"]] = data
    (folder / "finehard.json").write_text(json.dumps(ITEMS, indent=1))
    return images


def by_image(items: list[dict], image_of) -> dict[bytes, dict]:
    """Items keyed by their image's bytes (the export renames the files), f_path left out."""
    return {image_of(item["f_path"]): {k: v for k, v in item.items() if k != "f_path"} for item in items}


def boxes_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for box, released in zip(got, want):
        assert box.keys() == released.keys()
        assert box["bbox"] == [round(v, 6) for v in released["bbox"]]
        assert {k: v for k, v in box.items() if k != "bbox"} == {k: v for k, v in released.items() if k != "bbox"}


def test_finehard_comes_back_whole(tmp_path):
    source = tmp_path / "FineHARD"
    images = write_finehard(source)
    fggrn, out = tmp_path / "fggrn", tmp_path / "export"
    settings = ("-s", "run.progress=false", "-s", "run.executor=local")
    result = invoke("import", "fgclip", source / "finehard.json", fggrn, "--images", source, *settings)
    assert result.exit_code == 0, result.output
    result = invoke("export", "fgclip", fggrn, out)
    assert result.exit_code == 0, result.output

    exported = json.loads((out / "fgclip.json").read_text())
    got = by_image(exported, lambda f_path: (out / f_path).read_bytes())
    want = by_image(ITEMS, images.__getitem__)
    assert got.keys() == want.keys()  # the same images, every one of them
    for image, item in want.items():
        assert {k: got[image][k] for k in ("caption", "short_caption")} == {k: item[k] for k in ("caption", "short_caption")}
        assert got[image].keys() == item.keys()
        boxes_equal(got[image]["bbox_info"], item["bbox_info"])
    # FG-CLIP's own loader rules read it as they read the release
    assert len(load_like_fgclip(out, out)) == len(ITEMS)
    summary = json.loads((out / "_export.fgdata").read_text())
    assert summary["left_out"] == {"no_usable_box": 0, "no_box_with_negatives": 0} and summary["without_negatives"] == 2


def test_export_import_export_is_stable(tmp_path):
    """What the export wrote imports back and exports to the same items again."""
    source = tmp_path / "FineHARD"
    write_finehard(source)
    settings = ("-s", "run.progress=false", "-s", "run.executor=local")
    assert invoke("import", "fgclip", source / "finehard.json", tmp_path / "fggrn", "--images", source, *settings).exit_code == 0
    assert invoke("export", "fgclip", tmp_path / "fggrn", tmp_path / "first").exit_code == 0
    first = tmp_path / "first"
    assert invoke("import", "fgclip", first / "fgclip.json", tmp_path / "again", "--images", first, *settings).exit_code == 0
    assert invoke("export", "fgclip", tmp_path / "again", tmp_path / "second").exit_code == 0
    second = tmp_path / "second"
    one = by_image(json.loads((first / "fgclip.json").read_text()), lambda f: (first / f).read_bytes())
    two = by_image(json.loads((second / "fgclip.json").read_text()), lambda f: (second / f).read_bytes())
    assert one == two


def test_the_trainer_reads_the_released_long_expr(tmp_path):
    from pipeline.datasets.fggrn_rows import fgclip_rows, fgclip_sources

    source = tmp_path / "FineHARD"
    write_finehard(source)
    settings = ("-s", "run.progress=false", "-s", "run.executor=local")
    assert invoke("import", "fgclip", source / "finehard.json", tmp_path / "fggrn", "--images", source, *settings).exit_code == 0
    rows = {row["key"]: row for row in fgclip_rows(fgclip_sources([tmp_path / "fggrn"], None), max_boxes=4, with_images=False)}
    assert {key: row["long_exprs"] for key, row in rows.items()} == {item["f_path"]: [b["long_expr"] for b in item["bbox_info"][:4]] for item in ITEMS}


def test_fields_outside_the_layout_are_counted_not_lost_silently(tmp_path):
    from conftest import make_config

    from pipeline.core.shards import read_json
    from pipeline.runner import run_stage
    from pipeline.stages.fggrn.import_fgclip import ImportFgclipStage

    first, *rest = ITEMS
    extra = {**first, "url": "http://example.com/1.jpg", "bbox_info": [{**first["bbox_info"][0], "score": 0.9}, {**first["bbox_info"][1], "short_expr_negs": {}}]}
    (tmp_path / "finehard.json").write_text(json.dumps([extra, *rest]))
    run_stage(ImportFgclipStage(tmp_path / "finehard.json"), tmp_path / "fggrn", make_config())
    counters = read_json(tmp_path / "fggrn" / "_manifest.json")["counters"]
    assert counters["fields_not_kept"] == 2  # url, score
    assert counters["flagged_without_negatives"] == 1  # flag_short_neg 1 and no negatives: exported as 0


def test_a_long_expr_that_is_not_text_is_a_reject_and_a_blank_one_is_derived(tmp_path):
    from conftest import make_config, read_rows

    from pipeline.core.shards import read_rejects
    from pipeline.runner import run_stage
    from pipeline.stages.fggrn.import_fgclip import ImportFgclipStage

    first, second, *_ = ITEMS
    bad = {**first, "bbox_info": [{**first["bbox_info"][0], "long_expr": 5}]}
    blank = {**second, "bbox_info": [{**second["bbox_info"][0], "long_expr": "  "}, second["bbox_info"][1]]}
    (tmp_path / "finehard.json").write_text(json.dumps([bad, blank]))
    run_stage(ImportFgclipStage(tmp_path / "finehard.json"), tmp_path / "fggrn", make_config())
    assert [(r["key"], r["reason"]) for r in read_rejects(tmp_path / "fggrn").to_pylist()] == [(first["f_path"], "bad_long_expr")]
    (row,) = read_rows(tmp_path / "fggrn")
    assert row["long_exprs"] == [None, "Brightly lit shop windows on the right."]
