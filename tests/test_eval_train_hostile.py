"""Hostile input for `fgdata eval` and `fgdata train` (issue 21): NaN / Inf / inverted / huge boxes,
FG-OVD records of every wrong shape, paths outside the image root, sets with no usable row and
chains of the wrong shape. Each ends as counted skips plus a result, or a one-line error, within a
bounded time. The CLI runs in a subprocess: a box that reaches RoIAlign as NaN kills the process
(exit 139), and a test must report that instead of dying with it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.core.box_checks import BOX_REASONS, check_box
from pipeline.datasets.synthetic_world import COLOURS, PATTERNS, SHAPES, SIZES, write_world
from pipeline.eval.evaluate import Encoder, FgovdRecord, fgovd_items, hierarcaps_items, hierarchy_metrics, image_in_root, parse_fgovd_record

TRAIN_FAST = ["fgclip.num_workers=0", "fgclip.batch_size=4", "fgclip.max_steps=2", "fgclip.warmup_steps=1", "fgclip.shuffle_buffer=8", "run.progress=false"]
RECORD_REASONS = {"not_utf8", "not_json", "missing_field", "bad_img_path", "bad_bbox", "bad_positive", "bad_negatives", "box_not_finite"}


# ---------------------------------------------------------------- the box check, property-based

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**400), 10**400), st.booleans(), st.none(), st.text(max_size=3))
any_box = st.one_of(st.lists(numbers, max_size=6), st.tuples(numbers, numbers, numbers, numbers), st.text(), st.dictionaries(st.text(max_size=2), numbers, max_size=4), numbers)
sides = st.floats(min_value=1e-3, max_value=1e5)


@given(any_box, sides, sides)
def test_a_box_is_clamped_inside_the_image_or_rejected_with_a_reason_never_an_error(box, width, height):
    clean, problem = check_box(box, width, height)
    if problem:
        assert clean is None and problem[0] in BOX_REASONS and isinstance(problem[1], str) and len(problem[1]) < 200
    else:
        x1, y1, x2, y2 = clean
        assert all(math.isfinite(v) for v in clean)
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


@settings(max_examples=60, deadline=None)  # the first RoIAlign call starts torchvision up (over 1 s on a busy machine)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=4, max_size=4))
def test_only_boxes_roi_align_pools_to_finite_features_pass(box):
    """What the check lets through, RoIAlign (the call that segfaults on NaN) pools to finite,
    non-zero features; NaN and inf never get through."""
    from pipeline.models.clip_model import box_features

    clean, problem = check_box(box)
    if any(math.isnan(v) or math.isinf(v) for v in box):
        assert problem and problem[0] == "box_not_finite"
    if clean is not None:
        features = box_features(torch.ones(1, 4, 8, 8), torch.tensor([[0.0, *clean]]))
        assert torch.isfinite(features).all() and features.abs().sum() > 0


@given(st.floats(0, 0.4), st.floats(0, 0.4), st.floats(0.05, 0.5), st.floats(0.05, 0.5))
def test_a_box_inside_the_image_is_kept_as_it_is(x, y, w, h):
    assert check_box([x, y, x + w, y + h]) == ([x, y, x + w, y + h], None)


def test_each_kind_of_bad_box_has_its_reason():
    reasons = {
        "box_not_finite": [[math.nan, 0, 1, 1], [0, 0, math.inf, 1], [0, -math.inf, 1, 1], [0, 0, 10**400, 1]],
        "box_not_positive_size": [[0.6, 0.1, 0.2, 0.9], [0.1, 0.5, 0.9, 0.5]],
        "box_outside_image": [[-1e30, -1e30, 1e30, 1e30], [1.5, 1.5, 2, 2], [0.9, 0.9, 1.9, 1.9]],
        "box_not_four_numbers": ["0 0 1 1", [0, 0, 1], [0, 0, "1", 1], [True, 0, 1, 1], None, {"x": 1}],
    }
    for reason, boxes in reasons.items():
        for box in boxes:
            assert check_box(box)[1][0] == reason, box
    assert check_box([-0.01, 0.2, 1.02, 0.8]) == ([0.0, 0.2, 1.0, 0.8], None)  # a little past the border: clamped


# ---------------------------------------------------------------- the FG-OVD record check, property-based

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.sampled_from(["img_path", "bbox", "pos_expression", "neg_expression", "x"]), inner, max_size=5)),
    max_leaves=20,
)
phrase = st.text(min_size=1, max_size=20).filter(str.strip)


@given(json_values)
def test_any_json_line_becomes_a_typed_record_or_a_reason(value):
    record, problem = parse_fgovd_record(json.dumps(value))
    if problem:
        assert record is None and problem[0] in RECORD_REASONS
    else:
        assert isinstance(record, FgovdRecord) and record.positive.strip() and len(record.bbox) == 4
        assert all(isinstance(n, str) and n.strip() for n in record.negatives) and all(isinstance(v, float) for v in record.bbox)


@given(st.binary(max_size=60))
def test_any_bytes_become_a_record_or_a_reason(line):
    record, problem = parse_fgovd_record(line)
    assert (record is None) != (problem is None)


@given(phrase, phrase, st.lists(phrase, max_size=5), st.booleans())
def test_a_well_formed_record_keeps_its_phrases_whole(path, positive, negatives, as_dict):
    """Negatives stay phrases (never split into characters); FG-CLIP's dict shape gives its values."""
    written = {str(i): n for i, n in enumerate(negatives)} if as_dict else negatives
    line = json.dumps({"img_path": path, "bbox": [1, 2, 3, 4], "pos_expression": positive, "neg_expression": written})
    record, problem = parse_fgovd_record(line)
    if "\0" in path:
        assert problem[0] == "bad_img_path"
    else:
        assert problem is None and record == FgovdRecord(path, (1.0, 2.0, 3.0, 4.0), positive, tuple(negatives))


def test_a_single_string_negative_is_a_reason_not_its_characters():
    line = json.dumps({"img_path": "a.png", "bbox": [1, 2, 3, 4], "pos_expression": "a cat", "neg_expression": "a dog"})
    assert parse_fgovd_record(line)[1][0] == "bad_negatives"


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("fgovd")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (200, 100), (10, 10, 10)).save(root / "a.png")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(root / "sub" / "b.png")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(base / "secret.png")  # outside the root, readable
    (root / "notes.png").write_text("not an image")
    (root / "link.png").symlink_to(base / "secret.png")
    return root


@settings(max_examples=200)
@given(st.one_of(st.text(max_size=30), st.sampled_from(["../secret.png", "/etc/passwd", "sub/../../secret.png", "link.png", "./a.png", "sub", "a.png\0x", "..", "/", "a" * 300, "a/" * 3000])))
def test_an_img_path_names_a_regular_file_inside_the_root_or_gets_a_reason(image_root, img_path):
    path, problem = image_in_root(image_root, img_path)
    if problem:
        assert problem[0] in {"bad_img_path", "image_outside_root", "image_not_found", "image_not_a_file"}
    else:
        assert path.is_relative_to(image_root.resolve()) and path.is_file() and not path.is_symlink()


# ---------------------------------------------------------------- eval --fg-ovd on a hostile file

def test_eval_fg_ovd_scores_only_the_good_records_and_reports_the_rest_by_reason(tmp_path, image_root, tiny_clip):
    good = {"img_path": "a.png", "pos_expression": "a red circle", "neg_expression": ["a blue circle", "a green circle"]}
    lines = [
        json.dumps({**good, "bbox": [20, 10, 100, 50]}),
        json.dumps({**good, "bbox": [0, 0, 40, 40], "img_path": "sub/b.png"}),
        json.dumps({**good, "bbox": [10, 10, 50, 50], "neg_expression": {"0": "a blue circle", "1": "a green circle"}}),  # FG-CLIP's dict
        json.dumps({**good, "bbox": [-2, -1, 203, 101]}),  # a little past the border: clamped, scored
    ]
    hostile = {
        "box_not_finite": [{**good, "bbox": [math.nan, 1, 2, 3]}, {**good, "bbox": [0, 0, math.inf, 10]}, {**good, "bbox": [0, 0, 10**400, 10]}],
        "box_not_positive_size": [{**good, "bbox": [50, 10, -20, 30]}, {**good, "bbox": [50, 10, 0, 30]}],
        "box_outside_image": [{**good, "bbox": [500, 500, 10, 10]}, {**good, "bbox": [-1e30, -1e30, 2e30, 2e30]}],
        "bad_bbox": [{**good, "bbox": "20 10 100 50"}, {**good, "bbox": [1, 2, 3]}, {**good, "bbox": None}],
        "bad_negatives": [{**good, "bbox": [1, 1, 5, 5], "neg_expression": "a blue circle"}, {**good, "bbox": [1, 1, 5, 5], "neg_expression": [None, 3]}],
        "bad_positive": [{**good, "bbox": [1, 1, 5, 5], "pos_expression": ""}, {**good, "bbox": [1, 1, 5, 5], "pos_expression": None}, {**good, "bbox": [1, 1, 5, 5], "pos_expression": []}],
        "image_outside_root": [{**good, "bbox": [1, 1, 5, 5], "img_path": p} for p in ("../secret.png", str(image_root.parent / "secret.png"), "link.png")],
        "image_not_a_file": [{**good, "bbox": [1, 1, 5, 5], "img_path": "sub"}],
        "image_not_found": [{**good, "bbox": [1, 1, 5, 5], "img_path": "nope.png"}],
        "image_undecodable": [{**good, "bbox": [1, 1, 5, 5], "img_path": "notes.png"}],
        "bad_img_path": [{**good, "bbox": [1, 1, 5, 5], "img_path": 7}, {**good, "bbox": [1, 1, 5, 5], "img_path": "a" * 300 + ".png"}],
        "missing_field": [{"img_path": "a.png"}],
    }
    lines += [json.dumps(record) for records in hostile.values() for record in records]
    lines += ["not json {", "[1, 2, 3]"]
    raw = "\n".join(lines).encode() + b"\n\xff\xfe{\"img_path\": \"a.png\"}\n"
    (image_root / "fg.jsonl").write_bytes(raw)
    expected = {reason: len(records) for reason, records in hostile.items()} | {"not_json": 2, "not_utf8": 1}

    started = time.perf_counter()
    result = run_cli("eval", "--model", str(tiny_clip), "--fg-ovd", str(image_root / "fg.jsonl"), "--hard-negatives", "2", "--out", str(tmp_path / "eval.json"), timeout=120)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-1500:]}"
    benchmark = json.loads((tmp_path / "eval.json").read_text())["fg_ovd_benchmark"]
    assert benchmark["boxes"] == 4 and benchmark["skipped"] == expected, benchmark
    print(f"fg-ovd hostile: {len(lines) + 1} lines, 4 scored, skipped {sum(expected.values())} {expected}, {seconds:.1f}s")

    skipped = Counter()
    items = fgovd_items(image_root / "fg.jsonl", None, skipped)
    assert sorted(len(i["boxes"]) for i in items) == [1, 3] and skipped == expected
    dict_box = next(b for i in items for b in i["boxes"] if b[0] == [0.05, 0.1, 0.3, 0.6])
    assert dict_box[2] == ["a blue circle", "a green circle"]
    clamped = next(b for i in items for b in i["boxes"] if b[0][0] == 0.0 and b[0][2] == 1.0)
    assert clamped[0] == [0.0, 0.0, 1.0, 1.0]


def test_eval_fg_ovd_with_no_usable_record_is_one_line_naming_the_first_problem(tmp_path, tiny_clip):
    (tmp_path / "bad.jsonl").write_bytes(b'{"img_path": "../x.png", "bbox": [1, 1, 2, 2], "pos_expression": "a", "neg_expression": []}\n\xff\n')
    result = run_cli("eval", "--model", str(tiny_clip), "--fg-ovd", str(tmp_path / "bad.jsonl"), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no usable FG-OVD record (image_outside_root 1, not_utf8 1; first: line 1:" in result.stderr


# ---------------------------------------------------------------- FgGRN shards with bad boxes

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from pipeline.models.tiny import build_tiny_clip

    vocabulary = [f"a {s} {p} {c} {shape}" for s in SIZES for p in PATTERNS for c in COLOURS for shape in SHAPES]
    vocabulary += ["An image on a dark grey background showing at the top bottom left right and a photo of shape animal plant vehicle person"] * 5
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", vocabulary)


BAD_BOXES = {
    "box_not_finite": [[math.nan, 0.1, 0.5, 0.5], [0.1, 0.1, math.inf, 0.5], [-math.inf, 0.1, 0.5, 0.5]],
    "box_not_positive_size": [[0.6, 0.1, 0.2, 0.5], [0.3, 0.3, 0.3, 0.6]],
    "box_outside_image": [[-1e30, -1e30, 1e30, 1e30], [1.5, 1.5, 2.5, 2.5]],
}


def _rewrite(shard: Path, change) -> None:
    """Rewrites a shard's rows through `change(rows)`, keeping its schema."""
    table = pq.read_table(shard)
    pq.write_table(pa.Table.from_pylist(change(table.to_pylist()), schema=table.schema), shard)


@pytest.fixture(scope="module")
def bad_box_world(tmp_path_factory):
    """A 24-image world whose first regions carry NaN, inf, inverted, empty and huge boxes."""
    paths = write_world(tmp_path_factory.mktemp("badboxes"), 24, seed=3)

    def poison(rows):
        boxes = [box for reason_boxes in BAD_BOXES.values() for box in reason_boxes]
        for row, box in zip(rows, boxes):
            row["regions"][0]["box_norm"] = box
        return rows

    _rewrite(paths["fggrn"] / "train" / "part-00000.parquet", poison)
    return paths


def _subprocess_outcome(result: subprocess.CompletedProcess) -> str:
    return "killed by a signal (segfault in RoIAlign?)" if result.returncode < 0 or result.returncode == 139 else result.stderr[-1500:]


def test_eval_on_an_fggrn_shard_with_bad_boxes_runs_and_counts_them(bad_box_world, tiny_clip, tmp_path):
    started = time.perf_counter()
    result = run_cli("eval", "--model", str(tiny_clip), "--fggrn", str(bad_box_world["fggrn"]), "--out", str(tmp_path / "eval.json"), timeout=120)
    assert result.returncode == 0, _subprocess_outcome(result)
    fggrn = json.loads((tmp_path / "eval.json").read_text())["fggrn"]
    assert fggrn["skipped"] == {f"dropped_{reason}": len(boxes) for reason, boxes in BAD_BOXES.items()}
    assert fggrn["fg_ovd"]["accuracy"] is not None and fggrn["regional_retrieval"]["top1"] is not None
    print(f"eval fggrn hostile: 24 rows, {fggrn['regional_retrieval']['boxes']} boxes scored, {fggrn['skipped']}, {time.perf_counter() - started:.1f}s")


def test_train_on_an_fggrn_shard_with_bad_boxes_trains_on_the_good_ones(bad_box_world, tiny_clip, tmp_path):
    started = time.perf_counter()
    result = run_cli("train", str(bad_box_world["fggrn"]), "--model", str(tiny_clip), "--out", str(tmp_path / "run"), *[f"--set={s}" for s in TRAIN_FAST], timeout=180)
    assert result.returncode == 0, _subprocess_outcome(result)
    report = json.loads((tmp_path / "run" / "train.json").read_text())
    hard_negative_counts = {k: report["data"].pop(k) for k in list(report["data"]) if k.startswith("hard_negative_boxes")}
    assert report["data"] == {"rows": 24, "rows_usable": 24, **{f"dropped_{reason}": len(boxes) for reason, boxes in BAD_BOXES.items()}}
    assert hard_negative_counts.get("hard_negative_boxes", 0) > 0  # the good boxes still train the hard-negative loss
    assert all(math.isfinite(entry["loss"]) for entry in report["history"])
    assert result.stderr.count("fgclip data:") == 1, "the skips are summed up once"
    print(f"train fggrn hostile: 24 rows, {report['data']}, {time.perf_counter() - started:.1f}s")


# ---------------------------------------------------------------- sets with no usable row

def test_train_refuses_an_empty_shard_or_missing_images_quickly_with_one_line(tiny_clip, tmp_path):
    paths = write_world(tmp_path / "w", 12, seed=5)
    empty = tmp_path / "empty"
    empty.mkdir()
    table = pq.read_table(paths["fggrn"] / "train" / "part-00000.parquet")
    pq.write_table(table.slice(0, 0), empty / "part-00000.parquet")
    strangers = tmp_path / "strangers"
    strangers.mkdir()
    images = pq.read_table(paths["images"] / "train" / "part-00000.parquet").to_pylist()
    pq.write_table(pa.Table.from_pylist([{**row, "key": "other-" + row["key"]} for row in images]), strangers / "part-00000.parquet")
    for name, args in {"empty shard": [str(empty), "--images", str(paths["images"])], "keys missing from the images": [str(paths["fggrn"]), "--images", str(strangers)]}.items():
        started = time.perf_counter()
        result = run_cli("train", *args, "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / name.replace(" ", "-")), *[f"--set={s}" for s in TRAIN_FAST], timeout=60)
        seconds = time.perf_counter() - started
        # the model path does not exist: refusing on the data means the data was counted first
        assert result.returncode == 2 and "no usable FgGRN row" in result.stderr, (name, result.stderr[-800:])
        assert "Traceback" not in result.stderr and len(result.stderr) < 2000, name
        print(f"train {name}: refused in {seconds:.1f}s: {result.stderr.strip().splitlines()[-1]}")


def test_a_stream_with_nothing_to_yield_ends_instead_of_spinning(tmp_path):
    """FgclipStream over rows with no image: without the stop it loops over empty epochs forever."""
    paths = write_world(tmp_path / "w", 4, seed=6)
    strangers = tmp_path / "strangers"
    strangers.mkdir()
    pq.write_table(pa.table({"key": ["nobody"], "image": [b""]}), strangers / "part-00000.parquet")
    script = (
        "from pathlib import Path; from pipeline.config import load_config; from pipeline.datasets.fggrn_rows import FgclipStream\n"
        f"pairs = [(Path({str(paths['fggrn'] / 'train' / 'part-00000.parquet')!r}), Path({str(strangers / 'part-00000.parquet')!r}))]\n"
        "print(len(list(FgclipStream(pairs, load_config(None, []).fgclip, [0, 0, 0], [1, 1, 1]))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "0", result.stderr[-800:]


# ---------------------------------------------------------------- Radial Embedding on bad chains

GOOD_CHAIN = (["shape", "circle", "red circle", "a small red circle"], ["animal", "square", "blue circle", "a small blue circle"])
BAD_CHAINS = {
    "tiers_wrong_count": [(["shape", "circle", "a red circle"], GOOD_CHAIN[1]), (["a red circle"], GOOD_CHAIN[1])],
    "tiers_blank": [(["", "circle", "red circle", "a small red circle"], GOOD_CHAIN[1]), (["shape", "  ", "red circle", "a red circle"], GOOD_CHAIN[1])],
    "negative_tiers_wrong_count": [(GOOD_CHAIN[0], ["animal", "square"])],
    "negative_tiers_blank": [(GOOD_CHAIN[0], ["", "", "", ""])],
}


def _chain_shard(directory: Path, chains: list[tuple[list[str], list[str]]]) -> Path:
    directory.mkdir(parents=True)
    rows = [{"key": f"c{i}", "tiers": tiers, "negative_tiers": negative} for i, (tiers, negative) in enumerate(chains)]
    pq.write_table(pa.Table.from_pylist(rows), directory / "part-00000.parquet")
    return directory


def test_re_on_chains_of_the_wrong_shape_refuses_before_the_model_loads(tmp_path):
    shard = _chain_shard(tmp_path / "bad", [chain for chains in BAD_CHAINS.values() for chain in chains])
    started = time.perf_counter()
    result = run_cli("train", str(shard), "--objective", "re", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "run"), "--set=run.progress=false", timeout=60)
    assert result.returncode == 2 and "no usable chain" in result.stderr and "Traceback" not in result.stderr, result.stderr[-800:]
    print(f"re all bad: 6 chains refused in {time.perf_counter() - started:.1f}s: {result.stderr.strip().splitlines()[-1]}")


def test_re_skips_the_bad_chains_and_trains_on_the_rest(tmp_path, tiny_clip):
    bad = [chain for chains in BAD_CHAINS.values() for chain in chains]
    shard = _chain_shard(tmp_path / "mixed", [GOOD_CHAIN] * 6 + bad)
    result = run_cli("train", str(shard), "--objective", "re", "--model", str(tiny_clip), "--out", str(tmp_path / "run"),
                     *[f"--set={s}" for s in ("radial.max_steps=2", "radial.batch_size=4", "radial.warmup_steps=1", "run.progress=false")], timeout=180)
    assert result.returncode == 0, result.stderr[-1500:]
    report = json.loads((tmp_path / "run" / "train.json").read_text())
    assert report["data"]["rows_usable"] == 6 and report["data"]["rows"] - 6 == sum(v for k, v in report["data"].items() if k.startswith("skipped_"))
    assert all(entry["loss"] > 0 for entry in report["history"]), "blank tiers no longer train with loss 0"
    print(f"re mixed: {report['data']}")


def test_eval_hierarcaps_scores_only_well_shaped_chains(tmp_path, tiny_clip):
    shard = _chain_shard(tmp_path / "mixed", [GOOD_CHAIN] * 3 + [chain for chains in BAD_CHAINS.values() for chain in chains])
    skipped = Counter()
    chains, _ = hierarcaps_items([shard], 100, skipped)
    # eval reads the positive tiers only: chains whose negatives alone are bad still count
    assert chains == [GOOD_CHAIN[0]] * 5 and skipped == {"skipped_tiers_wrong_count": 2, "skipped_tiers_blank": 2}
    assert hierarchy_metrics(Encoder(str(tiny_clip)), chains)["chains"] == 5


def test_eval_fggrn_with_no_usable_row_is_one_line_not_an_empty_tensor_crash(tmp_path):
    from pipeline.errors import FgdataError
    from pipeline.eval.evaluate import fggrn_items

    paths = write_world(tmp_path / "w", 4, seed=7)
    strangers = tmp_path / "strangers"
    strangers.mkdir()
    pq.write_table(pa.table({"key": ["nobody"], "image": [b""]}), strangers / "part-00000.parquet")
    with pytest.raises(FgdataError, match=r"no usable FgGRN row .*\(rows 4, skipped_no_image 4\)"):
        fggrn_items([paths["fggrn"]], strangers, 100)
    with pytest.raises(FgdataError, match="--limit must be at least 1"):
        fggrn_items([paths["fggrn"]], None, 0)
