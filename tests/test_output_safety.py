"""--overwrite deletes only what fgdata wrote; OUT and the inputs never overlap; a changed or
unfinished input is refused, never mixed into an existing dataset; corrupt metadata is a one-line error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import assert_dataset_invariants, image_bytes, make_config, run_cli, write_caption_shard

from pipeline.core.shards import DONE_DIR, RUN_FILE, STATS_DIR, claim_output, shard_markers
from pipeline.errors import FgdataError
from pipeline.runner import run_stage
from pipeline.stages.fggrn.ingest import IngestStage
from pipeline.stages.fggrn.phrases import PhrasesStage


def image_folder(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / f"{name}.jpg").write_bytes(image_bytes())
        (root / f"{name}.txt").write_text(f"a red car number {name}")
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def owned_dataset(path: Path) -> Path:
    claim_output(path, "phrases", "h", overwrite=False)
    return path


# --- what --overwrite may delete ------------------------------------------------------------


def test_overwrite_refuses_a_folder_fgdata_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    (mine / "thesis").mkdir(parents=True)
    (mine / "thesis" / "chapter1.tex").write_text("years of work")
    before = snapshot(mine)
    with pytest.raises(FgdataError) as refused:
        claim_output(mine, "ingest", "h", overwrite=True)
    assert "not written by fgdata" in str(refused.value)
    assert "--overwrite" not in str(refused.value).split("so --overwrite will not")[-1]
    assert snapshot(mine) == before


def test_overwrite_refuses_an_owned_folder_that_also_holds_user_files(tmp_path):
    out = owned_dataset(tmp_path / "out")
    (out / "notes.md").write_text("mine")
    with pytest.raises(FgdataError, match=r"holds files fgdata did not write \(notes.md\)"):
        claim_output(out, "phrases", "h", overwrite=True)
    assert (out / "notes.md").read_text() == "mine"


def test_overwrite_replaces_only_what_fgdata_wrote(tmp_path):
    out = owned_dataset(tmp_path / "out")
    (out / "part-00000.parquet").write_bytes(b"old data")
    (out / DONE_DIR).mkdir()
    (out / DONE_DIR / "part-00000.parquet.done").write_text("x")
    claim_output(out, "ingest", "h2", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [RUN_FILE]
    assert json.loads((out / RUN_FILE).read_text())["stage"] == "ingest"


def test_overwrite_never_goes_through_a_symlink(tmp_path):
    target = owned_dataset(tmp_path / "real")
    (target / "part-00000.parquet").write_bytes(b"data")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(FgdataError, match="is a symlink"):
        claim_output(link, "phrases", "h", overwrite=True)
    assert (target / "part-00000.parquet").read_bytes() == b"data"


@pytest.mark.parametrize("where", ["input", "parent_of_input", "inside_input", "cwd_holding_input"])
def test_out_overlapping_the_input_is_refused_before_any_work(tmp_path, where, monkeypatch):
    source = image_folder(tmp_path / "data" / "photos", ["a", "b"])
    (tmp_path / "data" / "thesis.tex").write_text("mine")
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path / "data")
    out = {"input": source, "parent_of_input": tmp_path / "data", "inside_input": source / "out", "cwd_holding_input": Path(".")}[where]
    for overwrite in (False, True):
        with pytest.raises(FgdataError, match="the input itself|inside the input|holds the input"):
            run_stage(IngestStage(source), out, make_config(), overwrite=overwrite)
    assert snapshot(tmp_path) == before


def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    afile = tmp_path / "report.txt"
    afile.write_text("mine")
    with pytest.raises(FgdataError, match="is a file"):
        claim_output(afile, "ingest", "h", overwrite=True)
    with pytest.raises(FgdataError, match="which is a file"):
        claim_output(afile / "out", "ingest", "h", overwrite=False)
    assert afile.read_text() == "mine"


def test_cli_refusals_are_one_line_and_touch_nothing(tmp_path):
    source = image_folder(tmp_path / "photos", ["a"])
    mine = tmp_path / "mine"
    (mine / "thesis").mkdir(parents=True)
    (mine / "thesis" / "x.tex").write_text("mine")
    result = run_cli("ingest", str(source), str(mine), "--overwrite", timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "not written by fgdata" in result.stderr
    assert (mine / "thesis" / "x.tex").read_text() == "mine"
    result = run_cli("ingest", str(source), str(source / "out"), timeout=120)
    assert result.returncode == 2 and "inside the input" in result.stderr and not (source / "out").exists()


# --- changed, unfinished and corrupt inputs --------------------------------------------------


@pytest.mark.usefixtures("ray_session")
def test_ingest_resume_after_the_source_changed_is_refused_and_overwrite_redoes_it(tmp_path):
    source = image_folder(tmp_path / "photos", ["a", "c", "e", "g", "i"])
    out = tmp_path / "images"
    config = make_config("ingest.rows_per_shard=2")
    run_stage(IngestStage(source), out, config)
    image_folder(source, ["b"])  # sorts into the first shard: every later shard shifts
    with pytest.raises(FgdataError, match="the input changed since that run"):
        run_stage(IngestStage(source), out, config)
    summary = run_stage(IngestStage(source), out, config, overwrite=True)
    assert summary.rows_out == 6
    assert_dataset_invariants(out, expected_keys={"a", "b", "c", "e", "g", "i"})


@pytest.mark.usefixtures("ray_session")
def test_downstream_resume_after_the_input_changed_is_refused(tmp_path):
    source = tmp_path / "captions"
    for shard in range(2):
        write_caption_shard(source / f"part-{shard:05d}.parquet", [{"key": f"{shard}-{i}", "short_caption": "a red car"} for i in range(5)])
    out = tmp_path / "phrases"
    run_stage(PhrasesStage(source), out, make_config())
    write_caption_shard(source / "part-00001.parquet", [{"key": "new", "short_caption": "a blue bus"}])
    with pytest.raises(FgdataError, match="part-00001.parquet made from a different input"):
        run_stage(PhrasesStage(source), out, make_config())
    write_caption_shard(source / "part-00002.parquet", [{"key": "x", "short_caption": "a cat"}])
    (source / "part-00000.parquet").unlink()
    with pytest.raises(FgdataError, match="part-00000.parquet that the input no longer has"):
        run_stage(PhrasesStage(source), out, make_config())


@pytest.mark.usefixtures("ray_session")
def test_a_marker_left_by_another_run_is_not_taken_as_done(tmp_path):
    source = tmp_path / "captions"
    write_caption_shard(source / "part-00000.parquet", [{"key": "k", "short_caption": "a red car"}])
    out = tmp_path / "phrases"
    run_stage(PhrasesStage(source), out, make_config())
    marker = out / DONE_DIR / "part-00000.parquet.done"
    assert shard_markers(out)["part-00000.parquet"]  # the marker carries the run's fingerprint
    marker.write_text("fingerprint-of-an-older-run")
    with pytest.raises(FgdataError, match="made from a different input"):
        run_stage(PhrasesStage(source), out, make_config())


@pytest.mark.usefixtures("ray_session")
def test_a_corrupt_stats_file_on_resume_redoes_that_shard(tmp_path):
    source = tmp_path / "captions"
    write_caption_shard(source / "part-00000.parquet", [{"key": "k", "short_caption": "a red car"}])
    out = tmp_path / "phrases"
    run_stage(PhrasesStage(source), out, make_config())
    (out / STATS_DIR / "part-00000.json").write_text("{not json")
    summary = run_stage(PhrasesStage(source), out, make_config())
    assert (summary.shards_run, summary.rows_out) == (1, 1)
    assert_dataset_invariants(out)


def test_an_unfinished_input_is_refused(tmp_path):
    source = tmp_path / "images"
    claim_output(source, "ingest", "h", overwrite=False)
    write_caption_shard(source / "part-00000.parquet", [{"key": "k", "short_caption": "a red car"}])  # fgdata started writing it, never finished
    with pytest.raises(FgdataError, match="is not finished: it has no _manifest.json"):
        run_stage(PhrasesStage(source), tmp_path / "phrases", make_config())
    assert not (tmp_path / "phrases").exists()


@pytest.mark.parametrize("content", ["", "{trunc", "[1, 2]", "\xff\xfe garbage"])
def test_corrupt_metadata_is_a_one_line_error_before_any_work(tmp_path, content):
    source = tmp_path / "images"
    claim_output(source, "ingest", "h", overwrite=False)
    write_caption_shard(source / "part-00000.parquet", [{"key": "k", "short_caption": "a red car"}])
    (source / "_manifest.json").write_text(content, encoding="latin-1")
    result = run_cli("phrases", str(source), str(tmp_path / "phrases"), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "_manifest.json: corrupt fgdata metadata" in result.stderr
    assert not (tmp_path / "phrases").exists()
    out = owned_dataset(tmp_path / "out")
    (out / RUN_FILE).write_text(content, encoding="latin-1")
    with pytest.raises(FgdataError, match="_run.json: corrupt fgdata metadata"):
        claim_output(out, "phrases", "h", overwrite=True)


def test_a_kept_shard_is_never_rewritten_by_a_resume(tmp_path, ray_session):
    source = tmp_path / "captions"
    write_caption_shard(source / "part-00000.parquet", [{"key": "k", "short_caption": "a red car"}])
    out = tmp_path / "phrases"
    run_stage(PhrasesStage(source), out, make_config())
    written = os.stat(out / "train" / "part-00000.parquet").st_mtime_ns
    summary = run_stage(PhrasesStage(source), out, make_config())
    assert (summary.shards_run, summary.shards_skipped) == (0, 1)
    assert os.stat(out / "train" / "part-00000.parquet").st_mtime_ns == written
    assert pq.read_metadata(out / "train" / "part-00000.parquet").num_rows == 1


def test_a_lineage_loop_is_a_one_line_error_not_a_recursion(tmp_path):
    from pipeline.core.shards import find_ancestor, write_json

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_json(a / "_manifest.json", {"kind": "fggrn", "inputs": [{"path": str(b)}]})
    write_json(b / "_manifest.json", {"kind": "regions", "inputs": [{"path": str(a)}]})
    with pytest.raises(FgdataError, match="lineage loops back"):
        find_ancestor(a, "images")
    write_json(b / "_manifest.json", {"kind": "regions", "inputs": [{"path": "nul\0byte"}, {"path": str(tmp_path / "gone")}]})
    assert find_ancestor(a, "images") is None
