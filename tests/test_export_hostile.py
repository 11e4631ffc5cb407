"""Hostile input for `fgdata export fgclip`, `fgdata info` and `eval --out`, through the CLI.

Each case ends as exported rows, or as exit code 2 with a one-line message naming what to fix;
never a traceback, and never a file replaced that fgdata did not write.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.datasets.fgclip_export import image_file_name
from pipeline.datasets.synthetic_world import write_world

runner = CliRunner()


def invoke(*args) -> "Result":
    result = runner.invoke(app, [str(a) for a in args])
    # CliRunner catches what escapes: anything but typer's exit is a traceback for a user
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def refused(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def make_world(root: Path, keys: list[str] | None = None, count: int = 4) -> dict[str, Path]:
    """A few synthetic images with their FgGRN rows (no Ray); `keys` replaces their keys."""
    paths = write_world(root / "world", count if keys is None else len(keys), side=16)
    if keys is not None:
        for kind in ("images", "fggrn"):
            shard = paths[kind] / "train" / "part-00000.parquet"
            table = pq.read_table(shard)
            pq.write_table(table.set_column(table.schema.get_field_index("key"), "key", pa.array(keys, pa.string())), shard)
    return paths


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def exported(out: Path) -> list[dict]:
    # strict JSON, as FG-CLIP's loader reads it: NaN or Infinity would fail here
    return json.loads((out / "fgclip.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in fgclip.json"))


# --- ownership: a folder fgdata did not write is never written to -----------------------------


def test_export_refuses_a_folder_it_did_not_write_and_keeps_the_users_files(tmp_path):
    world = make_world(tmp_path)
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    (out / "fgclip.json").write_text('["my own annotations"]\n')
    (out / "images" / "astronaut.jpg").write_bytes(b"\xff\xd8 my photo")
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        message = refused(invoke("export", "fgclip", world["fggrn"], out, *extra), str(out), "not written by fgdata", "choose a new folder")
        assert "--overwrite" not in message  # never offered for a folder fgdata did not write
        assert snapshot(out) == before
    # nor through a symlink to it
    link = tmp_path / "link"
    link.symlink_to(out)
    refused(invoke("export", "fgclip", world["fggrn"], link, "--overwrite"), "symlink")
    assert snapshot(out) == before


def test_export_refuses_another_stages_folder_and_its_own_input(tmp_path):
    world = make_world(tmp_path)
    stage_out = tmp_path / "regions"
    stage_out.mkdir()
    (stage_out / "_run.json").write_text(json.dumps({"stage": "ground", "settings_hash": "x"}))
    (stage_out / "part-00000.parquet").write_bytes(b"their shard")
    before = snapshot(stage_out)
    for extra in ([], ["--overwrite"]):
        refused(invoke("export", "fgclip", world["fggrn"], stage_out, *extra), "'ground'", "not an export", "choose a new folder")
    assert snapshot(stage_out) == before
    before = snapshot(world["fggrn"])
    refused(invoke("export", "fgclip", world["fggrn"], world["fggrn"], "--overwrite"))
    assert snapshot(world["fggrn"]) == before


def test_export_is_refreshed_in_place_and_overwrite_deletes_only_its_own_files(tmp_path):
    world = make_world(tmp_path, keys=["a", "b", "c"])
    out = tmp_path / "export"
    assert invoke("export", "fgclip", world["fggrn"], out).exit_code == 0
    record = json.loads((out / "_run.fgdata").read_text())
    assert record["stage"] == "export-fgclip"
    first = exported(out)
    paths = [out / item["f_path"] for item in first]
    # the user adds files of their own; one exported image is damaged keeping its size; one is
    # replaced by a link to a file outside that must not be written through
    (out / "notes.txt").write_text("mine")
    (out / "images" / "mine.jpg").write_bytes(b"mine")
    good = paths[0].read_bytes()
    paths[0].write_bytes(bytes(len(good)))
    outside = tmp_path / "precious.png"
    outside.write_bytes(b"precious")
    paths[1].unlink()
    paths[1].symlink_to(outside)

    assert invoke("export", "fgclip", world["fggrn"], out).exit_code == 0  # refreshed, no --overwrite needed
    assert paths[0].read_bytes() == good  # same size, other bytes: rewritten
    assert not paths[1].is_symlink() and outside.read_bytes() == b"precious"
    assert json.loads((out / "_export.fgdata").read_text())["images_written"] == 2
    assert exported(out) == first

    # a later export of other keys: refreshing keeps the earlier images (recorded as ours),
    # --overwrite removes exactly those and nothing of the user's
    other = make_world(tmp_path / "other", keys=["x", "y"])
    assert invoke("export", "fgclip", other["fggrn"], out).exit_code == 0
    assert all(p.exists() for p in paths)
    assert invoke("export", "fgclip", other["fggrn"], out, "--overwrite").exit_code == 0
    assert not any(p.exists() for p in paths)
    assert (out / "notes.txt").read_text() == "mine" and (out / "images" / "mine.jpg").read_bytes() == b"mine"
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(["mine.jpg", *(Path(i["f_path"]).name for i in exported(out))])
    assert [i["f_path"] for i in exported(out)] == [f"images/{image_file_name(k, 'PNG')}" for k in ("x", "y")]


def test_export_overwrite_never_deletes_outside_what_its_record_may_name(tmp_path):
    world = make_world(tmp_path)
    out = tmp_path / "export"
    assert invoke("export", "fgclip", world["fggrn"], out).exit_code == 0
    (tmp_path / "thesis.txt").write_text("years of work")
    (out / "images" / ".hidden").write_text("mine")
    record = json.loads((out / "_run.fgdata").read_text())
    record["files"] += ["../thesis.txt", "images/../../thesis.txt", "images/.hidden", "/etc/hostname"]
    (out / "_run.fgdata").write_text(json.dumps(record))
    assert invoke("export", "fgclip", world["fggrn"], out, "--overwrite").exit_code == 0
    assert (tmp_path / "thesis.txt").read_text() == "years of work" and (out / "images" / ".hidden").read_text() == "mine"


# --- names: unique, stable, within limits, never hidden or option-like ------------------------

HOSTILE_KEYS = [
    "猫", "犬", "日本語", "sub/a", "sub_a", "a" * 300, "/".join(["deep"] * 80), ".", "..", "-rf", ".hidden",
    "--help", "_", "a b", "A", "a", "x\\y", "../../escape", "/abs/path", "%2e%2e%2f", "con", "nul.txt", "😀" * 100,
]


def test_export_gives_every_key_its_own_stable_safe_file_name(tmp_path):
    world = make_world(tmp_path, keys=HOSTILE_KEYS)
    out = tmp_path / "export"
    started = time.perf_counter()
    result = invoke("export", "fgclip", world["fggrn"], out)
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    items = exported(out)
    names = [Path(item["f_path"]).name for item in items]
    assert len(items) == len(HOSTILE_KEYS) and len(set(names)) == len(names) == len({n.lower() for n in names})
    assert all(len(n.encode()) <= 120 and n[0] not in ".-" for n in names), names
    assert all(item["f_path"] == f"images/{n}" for item, n in zip(items, names))  # nothing written outside images/
    images = {r["key"]: r["image"] for r in pq.read_table(world["images"] / "train" / "part-00000.parquet").to_pylist()}
    assert [(out / item["f_path"]).read_bytes() for item in items] == [images[k] for k in HOSTILE_KEYS]
    assert {p.name for p in (out / "images").iterdir()} == set(names)
    # stable: the name depends on the key alone, and a second export writes nothing new
    assert names == [image_file_name(k, "PNG") for k in HOSTILE_KEYS]
    assert invoke("export", "fgclip", world["fggrn"], out).exit_code == 0
    assert json.loads((out / "_export.fgdata").read_text())["images_written"] == 0
    print(f"hostile keys: {len(HOSTILE_KEYS)} in, {len(items)} exported, {seconds:.2f}s")


def test_bad_boxes_are_left_out_and_the_json_stays_strict(tmp_path):
    world = make_world(tmp_path, count=3)
    shard = world["fggrn"] / "train" / "part-00000.parquet"
    rows = pq.read_table(shard).to_pylist()
    bad = [[math.nan, 0.1, 0.5, 0.5], [0.1, 0.1, math.inf, 0.5], [0.6, 0.1, 0.2, 0.5], [5.0, 5.0, 6.0, 6.0]]
    rows[0]["regions"] = [{**rows[0]["regions"][0], "box_norm": box} for box in bad] + rows[0]["regions"]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard)
    out = tmp_path / "export"
    result = invoke("export", "fgclip", world["fggrn"], out)
    assert result.exit_code == 0 and "4 bad box(es) left out" in result.stdout
    items = exported(out)
    assert len(items) == 3 and len(items[0]["bbox_info"]) == len(rows[0]["regions"]) - 4
    assert all(0 <= v <= 1 for item in items for box in item["bbox_info"] for v in box["bbox"])


# --- the wrong input: refused before anything is written ---------------------------------------


def test_export_of_image_shards_is_refused_before_writing(tmp_path):
    world = make_world(tmp_path)
    out = tmp_path / "export"
    refused(invoke("export", "fgclip", world["images"], out), "'images' shards", "not fggrn")
    assert not out.exists()
    # without a manifest, the columns tell
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "part-00000.parquet").write_bytes((world["images"] / "train" / "part-00000.parquet").read_bytes())
    refused(invoke("export", "fgclip", loose, out, "--images", world["images"]), "missing required column 'long_caption'")
    assert not out.exists()


CORRUPT_JSON = {"truncated": '{"kind": "fgg', "empty": "", "not json": "hello", "a list": "[1, 2]", "binary": "\udcff"}


@pytest.mark.parametrize("damage", [*CORRUPT_JSON, "no kind"])
def test_corrupt_manifest_is_named_by_info_and_export(tmp_path, damage):
    world = make_world(tmp_path)
    manifest = world["fggrn"] / "_manifest.json"
    if damage == "no kind":
        manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "kind"}))
    else:
        manifest.write_bytes(CORRUPT_JSON[damage].encode("utf-8", "surrogateescape"))
    refused(invoke("info", world["fggrn"]), str(manifest))
    refused(invoke("export", "fgclip", world["fggrn"], tmp_path / "export"), str(manifest))
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("damage", [*CORRUPT_JSON, "no stage"])
def test_corrupt_run_record_in_the_export_folder_is_refused_untouched(tmp_path, damage):
    world = make_world(tmp_path)
    out = tmp_path / "export"
    assert invoke("export", "fgclip", world["fggrn"], out).exit_code == 0
    run_file = out / "_run.fgdata"
    if damage == "no stage":
        run_file.write_text(json.dumps({"files": ["fgclip.json"]}))
    else:
        run_file.write_bytes(CORRUPT_JSON[damage].encode("utf-8", "surrogateescape"))
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        refused(invoke("export", "fgclip", world["fggrn"], out, *extra), str(out))
        assert snapshot(out) == before


def test_info_names_a_corrupt_part_rejects_or_manifest_file(tmp_path):
    world = make_world(tmp_path)
    fggrn = world["fggrn"]
    assert "regions:" in invoke("info", fggrn).stdout
    # a damaged _stats file or run record is not read by info: it still describes the data
    (fggrn / "_stats" / "part-00000.json").write_text("{tru")
    (fggrn / "_run.json").write_text("[")
    assert invoke("info", fggrn).exit_code == 0

    rejects = fggrn / "_rejects" / "part-00000.parquet"
    good_rejects = rejects.read_bytes()
    rejects.write_bytes(b"PAR1 not parquet")
    refused(invoke("info", fggrn), str(rejects))
    pq.write_table(pa.table({"key": ["k"], "why": ["x"]}), rejects)
    refused(invoke("info", fggrn), str(rejects), "'reason'")
    pq.write_table(pa.table({"key": ["k"], "reason": [None], "detail": [None]}, schema=pa.schema([("key", pa.string()), ("reason", pa.string()), ("detail", pa.string())])), rejects)
    assert "None" in invoke("info", fggrn).stdout  # a null reason or detail is shown, not a crash
    rejects.write_bytes(good_rejects)

    part = fggrn / "train" / "part-00000.parquet"
    table = pq.read_table(part)
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    refused(invoke("info", fggrn), str(part))
    pq.write_table(table.drop_columns(["regions"]), part)
    refused(invoke("info", fggrn), str(part), "'regions'")

    manifest = fggrn / "_manifest.json"
    content = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**content, "provenance": [1]}))
    refused(invoke("info", fggrn), str(manifest), "provenance")
    manifest.write_text(json.dumps({k: v for k, v in content.items() if k != "stage"}))
    refused(invoke("info", fggrn), str(manifest), "'stage'")


# --- eval --out: an existing file is replaced only when asked ---------------------------------


def test_eval_out_refuses_an_existing_file_before_loading_anything(tmp_path):
    world = make_world(tmp_path)
    results = tmp_path / "results.json"
    results.write_text("my earlier results")
    # the model does not exist: the refusal must come before it is looked for
    refused(invoke("eval", "--model", tmp_path / "no-model", "--fggrn", world["fggrn"], "--out", results), str(results), "--overwrite")
    assert results.read_text() == "my earlier results"
    refused(invoke("eval", "--model", tmp_path / "no-model", "--fggrn", world["fggrn"], "--out", tmp_path), "is a folder")
    refused(invoke("eval", "--model", tmp_path / "no-model", "--fggrn", world["fggrn"], "--out", results / "x.json"), "which is a file")
    # with --overwrite the check passes and the run goes on to the model, which is then missing
    message = refused(invoke("eval", "--model", tmp_path / "no-model", "--fggrn", world["fggrn"], "--out", results, "--overwrite"))
    assert "already exists" not in message and results.read_text() == "my earlier results"


def test_eval_out_with_overwrite_replaces_the_file(tmp_path):
    from pipeline.models.tiny import build_tiny_clip

    world = make_world(tmp_path)
    clip = build_tiny_clip(tmp_path / "clip", ["a small solid red circle at the top left"] * 20)
    results = tmp_path / "results.json"
    results.write_text("old")
    assert invoke("eval", "--model", clip, "--fggrn", world["fggrn"], "--out", results, "--overwrite", "--hard-negatives", "2").exit_code == 0
    assert "fggrn" in json.loads(results.read_text())
