"""`fgdata export fgclip` read back the way FG-CLIP's own stage-2 loaders read it.

`load_like_fgclip` is written from the rules of `LazySupervisedBboxDataset` and
`DataCollatorForSupervisedDataset` (FG-CLIP 1 `fgclip/train/train_fgclip.py` at 0fcea59, FG-CLIP 2
`fgclip2/train/train_fgclip2.py`), not copied from them: `scripts/train.sh` passes a folder as
--data_path and every `*.json` / `*.jsonl` in it is concatenated into the item list; an item keeps
its first 4 boxes, each region text is random.choice([short_expr, long_expr]), a box with
flag_short_neg == 1 adds [short_expr, *negatives] (the hard loss reshapes them to 11 per box), and
FG-CLIP 1's collator concatenates the hard sets of a batch, failing when there are none.
"""

from __future__ import annotations

import glob
import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.datasets.fgclip_export import LONG_EXPR_MAX_WORDS, export_fgclip, long_expression, region_description
from pipeline.datasets.synthetic_world import hard_negatives, write_world
from pipeline.errors import FgdataError

runner = CliRunner()
MAX_ANNS = 4  # train_fgclip.py: self.max_anns
HARD_SET = 11  # fgclip.py hard_contrastive_loss: reshape(batch_size, 11, -1)


def load_like_fgclip(data_path: Path, image_folder: Path, seed: int = 0) -> list[dict]:
    """One loaded instance per item, as the reference dataset's __getitem__ builds it."""
    rng = random.Random(seed)
    if str(data_path).endswith((".json", ".jsonl")):
        items = json.load(open(data_path, encoding="utf-8"))
    else:
        items = []
        for pattern in ("*.json", "*.jsonl"):
            for name in glob.glob(os.path.join(data_path, pattern)):
                items += json.load(open(name, encoding="utf-8"))  # a dict adds its keys: strings
    instances = []
    for item in items:
        caption, short = item["caption"], "a photo of " + item["short_caption"]  # a str item: TypeError here
        with Image.open(os.path.join(image_folder, item["f_path"])) as image:
            image.convert("RGB")
        boxes = item["bbox_info"][:MAX_ANNS]
        region_texts, hard_sets = [], []
        for box in boxes:
            x1, y1, x2, y2 = box["bbox"][:4]
            if x1 > x2 or y1 > y2:
                raise ValueError("Box coordinates are invalid.")
            assert all(isinstance(v, float | int) and 0 <= v <= 1 for v in box["bbox"]) and len(box["bbox"]) == 4, box["bbox"]
            region_texts.append(rng.choice([box["short_expr"], box["long_expr"]]))
            if box["flag_short_neg"] == 1:
                hard_sets.append([box["short_expr"], *box["short_expr_negs"].values()])
        instances.append({"caption": caption, "short": short, "region_texts": region_texts, "hard": hard_sets, "item": item})
    return instances


def collate(instances: list[dict]) -> dict:
    hard = [s for instance in instances for s in instance["hard"]]
    if not hard:  # FG-CLIP 1's collator: torch.cat(hard_texts) over an empty list
        raise RuntimeError("torch.cat(): expected a non-empty list of Tensors")
    if any(len(s) != HARD_SET for s in hard):
        raise RuntimeError(f"hard sets of {sorted({len(s) for s in hard})} texts cannot be reshaped to {HARD_SET}")
    return {"captions": [i["caption"] for i in instances], "hard_texts": hard}


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def world_with(tmp_path: Path, count: int, change=None) -> dict[str, Path]:
    """A synthetic world whose FgGRN rows `change(rows)` may rewrite."""
    paths = write_world(tmp_path / "world", count, side=32)
    if change is not None:
        shard = paths["fggrn"] / "train" / "part-00000.parquet"
        rows = pq.read_table(shard).to_pylist()
        change(rows)
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard)
    return paths


def region(phrase: str, box: list[float], score: float = 1.0, negatives: list[str] | None = None, caption: str = "") -> dict:
    start = caption.find(phrase)
    negs = negatives if negatives is not None else [f"{phrase} {i}" for i in range(10)]
    return {
        "phrase": phrase, "start": max(start, 0), "end": max(start, 0) + len(phrase), "head": phrase.split()[-1], "box": [v * 32 for v in box],
        "box_norm": box, "score": score, "negatives_flag": "ok",
        "negatives": [{"text": t, "attribute": "colour", "entailment": 0.0, "contradiction": 1.0, "neutral": 0.0} for t in negs],
    }


# --- the check that stays: the whole export through the loader's rules --------------------------


def test_export_folder_loads_and_collates_like_train_sh(tmp_path):
    world = world_with(tmp_path, 24)
    out = tmp_path / "fgclip"
    result = invoke("export", "fgclip", world["fggrn"], out)
    assert result.exit_code == 0, result.output
    # train.sh: --data_path is the folder, --image_folder the folder f_path is relative to
    instances = load_like_fgclip(out, out)
    assert len(instances) == 24 and sorted(p.name for p in out.glob("*.json*")) == ["fgclip.json"]
    for batch in range(0, len(instances), 1):  # every batch, even of one item, has a hard set
        collate(instances[batch : batch + 1])
    for instance in instances:
        item = instance["item"]
        boxes = item["bbox_info"][:MAX_ANNS]
        assert len({b["short_expr"] for b in boxes}) == len(boxes)  # first 4 boxes: different phrases
        assert item["caption"] != item["short_caption"]
        for box in boxes:
            texts = [box["short_expr"], box["long_expr"], *box["short_expr_negs"].values()]
            assert all(t == t.lower() for t in texts)
            assert box["long_expr"].startswith(box["short_expr"]) and box["long_expr"] != item["caption"]
            assert len(box["long_expr"].split()) <= LONG_EXPR_MAX_WORDS
    # the synthetic long caption places each shape: that is what long_expr adds to the phrase
    first = instances[0]["item"]["bbox_info"][0]
    assert first["long_expr"].removeprefix(first["short_expr"]) in (" at the top left", " at the top right", " at the bottom left", " at the bottom right")
    # a refresh and an --overwrite keep the folder loadable
    assert invoke("export", "fgclip", world["fggrn"], out).exit_code == 0
    assert invoke("export", "fgclip", world["fggrn"], out, "--overwrite").exit_code == 0
    assert len(load_like_fgclip(out, out)) == 24
    summary = json.loads((out / "_export.fgdata").read_text())
    print(f"loader check: 24 rows in, {summary['items']} items, {summary['boxes']} boxes, {len(instances)} single-item batches collated")


def test_an_old_export_folder_is_taken_over_and_its_json_records_removed(tmp_path):
    world = world_with(tmp_path, 3)
    out = tmp_path / "fgclip"
    assert invoke("export", "fgclip", world["fggrn"], out).exit_code == 0
    # the layout before this fix: the same records named *.json, which the loader read as items
    (out / "_run.fgdata").rename(out / "_run.json")
    (out / "_export.fgdata").rename(out / "_export.json")
    record = json.loads((out / "_run.json").read_text())
    (out / "_run.json").write_text(json.dumps({**record, "files": [*record["files"], "_export.json"]}))
    with pytest.raises(TypeError, match="string indices must be integers"):
        load_like_fgclip(out, out)
    (out / "mine.json").write_text("[]")  # the user's: kept, and named in a warning
    result = invoke("export", "fgclip", world["fggrn"], out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["DATACARD.md", "_export.fgdata", "_run.fgdata", "fgclip.json", "images", "mine.json"]
    assert "mine.json" in result.stderr and "read every *.json" in result.stderr
    assert "_export.json" not in json.loads((out / "_run.fgdata").read_text())["files"]
    assert len(load_like_fgclip(out, out)) == 3


# --- hard negatives: kept without them, warned when a batch may hold none -------------------------


def _some_without_negatives(rows):
    caption = "a red circle, a blue square, a green square, a cyan square and a white circle"
    phrases = ["a red circle", "a blue square", "a green square", "a cyan square", "a white circle"]
    # row 0: the only box with 10 negatives is the 5th, beyond what the loader keeps
    rows[0]["regions"] = [region(p, [0.1 * i, 0.1, 0.1 * i + 0.1, 0.5], negatives=[] if i < 4 else None, caption=caption) for i, p in enumerate(phrases)]
    rows[0]["short_caption"] = caption
    rows[1]["regions"] = [{**r, "negatives": r["negatives"][:9]} for r in rows[1]["regions"]]  # 9 < 10: no box qualifies
    rows[2]["regions"] = []


def test_images_without_negatives_are_kept_and_negatives_come_first(tmp_path):
    """FineHARD keeps images whose boxes have no hard negatives (flag_short_neg 0): they still train the
    long/short and regional losses. FG-CLIP 1's collator fails only on a batch where no image has any."""
    world = world_with(tmp_path, 6, _some_without_negatives)
    out = tmp_path / "fgclip"
    result = invoke("export", "fgclip", world["fggrn"], out, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert "images left out: 1 no_usable_box" in result.stdout
    assert "note: 1 image(s) left out: 1 no_usable_box (no box passed the box checks)" in result.stderr
    summary = json.loads((out / "_export.fgdata").read_text())
    assert summary["left_out_keys"] == {"no_usable_box": ["world-000002"], "no_box_with_negatives": []}
    instances = load_like_fgclip(out, out)
    assert len(instances) == 5 and summary["without_negatives"] == 1
    assert [b["short_expr"] for b in instances[0]["item"]["bbox_info"]][0] == "a white circle"
    assert instances[1]["item"]["bbox_info"] and not any(b["flag_short_neg"] for b in instances[1]["item"]["bbox_info"])
    with pytest.raises(RuntimeError, match="non-empty list"):  # the one image without negatives, alone in a batch
        collate([instances[1]])
    collate(instances[:4])
    # a batch of 4 of these 5 images always holds a negative: no warning
    assert summary["chance_batch_without_negatives"] == 0.0 and "--require-negatives" not in result.stderr


def test_a_likely_batch_without_negatives_is_warned_about_and_require_negatives_leaves_them_out(tmp_path):
    def change(rows):
        for row in rows[1:]:
            row["regions"] = [{**r, "negatives": []} for r in row["regions"]]

    world = world_with(tmp_path, 6, change)
    result = invoke("export", "fgclip", world["fggrn"], tmp_path / "all", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "all" / "_export.fgdata").read_text())
    # 5 of 6 images without negatives, 2 drawn: C(5, 2) / C(6, 2)
    assert summary["items"] == 6 and summary["without_negatives"] == 5
    assert summary["chance_batch_without_negatives"] == pytest.approx(10 / 15)
    (warning,) = [line for line in result.stderr.splitlines() if "--require-negatives" in line]
    assert "5 of 6 images" in warning and "a batch of 2 holds none with chance 0.667" in warning
    # the reference batch (512) is larger than the set: every batch holds the one image with negatives
    quiet = invoke("export", "fgclip", world["fggrn"], tmp_path / "reference")
    assert quiet.exit_code == 0 and "--require-negatives" not in quiet.stderr

    result = invoke("export", "fgclip", world["fggrn"], tmp_path / "required", "--require-negatives", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "required" / "_export.fgdata").read_text())
    assert (summary["items"], summary["left_out"]["no_box_with_negatives"], summary["chance_batch_without_negatives"]) == (1, 5, 0.0)
    (note,) = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert note == (
        f"note: 5 image(s) left out: 5 no_box_with_negatives (no box with hard negatives among the first 4, --require-negatives); "
        f"their keys are in {tmp_path / 'required' / '_export.fgdata'}"
    )
    for instance in load_like_fgclip(tmp_path / "required", tmp_path / "required"):
        collate([instance])


@pytest.mark.parametrize(
    "items, without, batch, chance",
    [(10, 0, 4, 0.0), (10, 10, 4, 1.0), (10, 9, 4, 6 / 10), (10, 3, 4, 0.0), (4, 3, 512, 0.0), (1000, 900, 3, 900 * 899 * 898 / (1000 * 999 * 998))],
)
def test_chance_of_a_batch_without_negatives_is_hypergeometric(items, without, batch, chance):
    from math import comb

    from pipeline.datasets.fgclip_export import chance_of_batch_without_negatives

    drawn = min(batch, items)
    assert comb(without, drawn) / comb(items, drawn) == pytest.approx(chance)
    assert chance_of_batch_without_negatives(items, without, batch) == pytest.approx(chance)


# --- one box per phrase -------------------------------------------------------------------------


def test_one_box_per_phrase_the_best_scored(tmp_path):
    def change(rows):
        rows[0]["short_caption"] = caption = "a red circle and A Red Circle and a blue square"
        rows[0]["regions"] = [
            region("a red circle", [0.0, 0.0, 0.2, 0.2], 0.2, caption=caption),
            region("a red circle", [0.3, 0.3, 0.5, 0.5], 0.9, caption=caption),
            region("A Red Circle", [0.6, 0.6, 0.8, 0.8], 0.5, caption=caption),
            region("a blue square", [0.1, 0.5, 0.3, 0.7], 0.4, caption=caption),
        ]

    world = world_with(tmp_path, 2, change)
    summary = export_fgclip(world["fggrn"], tmp_path / "fgclip", progress=False)
    assert summary["duplicate_phrase_boxes"] == 2
    boxes = load_like_fgclip(tmp_path / "fgclip", tmp_path / "fgclip")[0]["item"]["bbox_info"]
    assert [(b["short_expr"], b["bbox"]) for b in boxes] == [("a red circle", [0.3, 0.3, 0.5, 0.5]), ("a blue square", [0.1, 0.5, 0.3, 0.7])]


# --- long_expr: the region's own description, not the caption -----------------------------------


@pytest.mark.parametrize(
    "text, phrase, expected",
    [
        ("A man holds a red cup on a wooden table, smiling.", "a red cup", "a red cup on a wooden table"),
        ("Showing a small red circle at the top left and a blue square.", "a small red circle", "a small red circle at the top left"),
        ("A photo of a dog.", "a dog", "a dog"),
        ("A dog (brown) sleeps.", "A dog", "A dog"),
        # cut at 20 words, and not on "of the"
        ("There is a tall lighthouse which stands on the rocky shore of a small island near the old stone harbour of the town in the north.",
         "a tall lighthouse", "a tall lighthouse which stands on the rocky shore of a small island near the old stone harbour"),
    ],
)
def test_region_description_is_the_phrase_with_its_modifiers(text, phrase, expected):
    start = text.index(phrase)
    description = region_description(text, start, start + len(phrase))
    assert description == expected and len(description.split()) <= LONG_EXPR_MAX_WORDS


def test_long_expression_prefers_the_long_caption_then_falls_back():
    row = {"short_caption": "a red cup and a dog", "long_caption": "A RED CUP stands on a shelf, next to a dog.", "phrase_source": "short_caption"}
    assert long_expression(row, {"phrase": "a red cup", "start": 0, "end": 9}) == ("A RED CUP stands on a shelf", "long_caption")
    assert long_expression({**row, "long_caption": "A mug on a shelf."}, {"phrase": "a red cup", "start": 0, "end": 9}) == ("a red cup", "short_caption")
    # a span that does not hold the phrase, and no long caption that does: the phrase alone
    assert long_expression({**row, "long_caption": None}, {"phrase": "a  cat", "start": 3, "end": 8}) == ("a cat", "phrase")
    long_row = {**row, "phrase_source": "long_caption"}
    assert long_expression(long_row, {"phrase": "a dog", "start": 38, "end": 43}) == ("a dog", "long_caption")


# --- captions: a missing long caption is refused, or exported when allowed and counted -------------


def test_missing_long_captions_are_refused_or_exported_and_counted(tmp_path):
    def change(rows):
        rows[0]["long_caption"] = None
        rows[1]["long_caption"] = rows[1]["short_caption"]  # the same text is no long caption either

    world = world_with(tmp_path, 5, change)
    out = tmp_path / "fgclip"
    result = invoke("export", "fgclip", world["fggrn"], out)
    assert result.exit_code == 2 and not out.exists()
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "2 of 5 images" in message and "--allow-missing-long-captions" in message
    result = invoke("export", "fgclip", world["fggrn"], out, "--allow-missing-long-captions")
    assert result.exit_code == 0 and "2 image(s) without a long caption" in result.stdout
    assert "warning: 2 image(s) have no long caption" in result.stderr
    assert json.loads((out / "_export.fgdata").read_text())["missing_long_captions"] == 2
    items = [i["item"] for i in load_like_fgclip(out, out)]
    assert sum(i["caption"] == i["short_caption"] for i in items) == 2


# --- case: the positive and its negatives in one case ---------------------------------------------


def test_region_texts_are_lowercased_unless_kept(tmp_path):
    def change(rows):
        rows[0]["short_caption"] = caption = "A Large Solid Red Circle"
        negatives = [t.title() for t, _ in hard_negatives("large", "solid", "red", "circle")]
        rows[0]["regions"] = [region("A Large Solid Red Circle", [0.1, 0.1, 0.5, 0.5], negatives=["a large solid red circle", *negatives], caption=caption)]

    world = world_with(tmp_path, 2, change)
    summary = export_fgclip(world["fggrn"], tmp_path / "lower", progress=False)
    assert summary["negatives_same_text"] == 1  # the positive again, in other case: no negative
    box = load_like_fgclip(tmp_path / "lower", tmp_path / "lower")[0]["item"]["bbox_info"][0]
    texts = [box["short_expr"], box["long_expr"], *box["short_expr_negs"].values()]
    assert box["short_expr"] == "a large solid red circle" and all(t == t.lower() for t in texts) and len(texts) == 12
    assert invoke("export", "fgclip", world["fggrn"], tmp_path / "kept", "--keep-case").exit_code == 0
    box = load_like_fgclip(tmp_path / "kept", tmp_path / "kept")[0]["item"]["bbox_info"][0]
    assert box["short_expr"] == "A Large Solid Red Circle" and box["short_expr_negs"]["0"] == "A Large Solid Green Circle"


def test_nothing_exportable_is_a_one_line_error(tmp_path):
    def change(rows):
        for row in rows:
            row["regions"] = [{**r, "negatives": []} for r in row["regions"]]

    world = world_with(tmp_path, 3, change)
    with pytest.raises(FgdataError, match="3 no_box_with_negatives"):
        export_fgclip(world["fggrn"], tmp_path / "fgclip", progress=False, require_negatives=True)
    assert not (tmp_path / "fgclip").exists()
