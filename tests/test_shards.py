import json
import subprocess
import sys
import zipfile

import pyarrow as pa
import pytest
from conftest import REPO

from pipeline.core.schemas import check_input_columns, conform, load_schema, validate_table
from pipeline.core.shards import claim_output, finished_shards, list_shards, read_shard, read_shard_schema, read_stats, write_shard
from pipeline.errors import FgdataError

PHRASE_ROW = {
    "key": "k1",
    "short_caption": "a dog",
    "long_caption": None,
    "phrase_source": "short_caption",
    "phrases": [{"text": "a dog", "start": 0, "end": 5, "head": "dog", "mentions": 1}],
    "spacy_model": "en_test-0",
}


def test_write_shard_writes_data_rejects_stats_then_marker(tmp_path):
    table = conform([PHRASE_ROW], "phrases")
    rejects = [{"key": "k2", "reason": "empty_caption", "detail": "no text", "source": "x"}]
    write_shard(tmp_path, "part-00000.parquet", table, "phrases", rejects, {"rows_in": 2})
    assert finished_shards(tmp_path) == {"part-00000.parquet"}
    assert read_shard(tmp_path / "train" / "part-00000.parquet").to_pylist() == [PHRASE_ROW]
    assert read_shard(tmp_path / "_rejects" / "part-00000.parquet").column("reason").to_pylist() == ["empty_caption"]
    assert read_stats(tmp_path) == {"part-00000.parquet": {"rows_in": 2}}
    assert not list(tmp_path.rglob(".*tmp-*")), "temporary files left behind"


def test_a_shard_that_breaks_its_schema_is_never_written(tmp_path):
    bad = pa.table({"key": ["a"], "short_caption": ["x"]})
    with pytest.raises(FgdataError, match="columns do not match the phrases schema"):
        write_shard(tmp_path, "part-00000.parquet", bad, "phrases", [], {})
    duplicate = conform([PHRASE_ROW, PHRASE_ROW], "phrases")
    with pytest.raises(FgdataError, match="duplicate values in key column 'key'"):
        write_shard(tmp_path, "part-00000.parquet", duplicate, "phrases", [], {})
    assert not list(tmp_path.rglob("*.parquet")) and finished_shards(tmp_path) == set()


def test_validate_table_names_the_column_with_wrong_type_or_nulls():
    schema = load_schema("images").arrow
    good = {"key": "a", "image": b"x", "width": 1, "height": 1, "format": "PNG", "short_caption": None, "source": "s"}
    wrong_type = pa.Table.from_pylist([good], schema=schema.set(2, pa.field("width", pa.int64())))
    with pytest.raises(FgdataError, match="column 'width' has type int64"):
        validate_table(wrong_type, "images", "here")
    null_key = pa.Table.from_pylist([{**good, "key": None}], schema=schema.set(0, pa.field("key", pa.string())))
    with pytest.raises(FgdataError, match="column 'key' has 1 null"):
        validate_table(null_key, "images", "here")


def test_input_checks_name_file_and_column(tmp_path):
    corrupt = tmp_path / "part-00000.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(FgdataError, match=f"{corrupt}: not a readable Parquet file"):
        read_shard_schema(corrupt)
    schema = pa.schema([("key", pa.int64()), ("text", pa.string())])
    with pytest.raises(FgdataError, match="f.parquet: missing required column 'short_caption'"):
        check_input_columns(schema, {"short_caption": pa.string()}, "f.parquet")
    with pytest.raises(FgdataError, match="f.parquet: column 'key' has type int64, expected string"):
        check_input_columns(schema, {"key": pa.string()}, "f.parquet")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FgdataError, match="holds no part-"):
        list_shards(empty)


def test_claim_output_resumes_own_run_and_refuses_others(tmp_path):
    out = tmp_path / "out"
    claim_output(out, "phrases", "hash1", overwrite=False)
    (out / ".part-00000.parquet.tmp-dead").write_text("left by a killed run")
    claim_output(out, "phrases", "hash1", overwrite=False)  # same stage, same settings: resume
    assert not (out / ".part-00000.parquet.tmp-dead").exists()
    with pytest.raises(FgdataError, match="other settings"):
        claim_output(out, "phrases", "hash2", overwrite=False)
    with pytest.raises(FgdataError, match="stage 'phrases'"):
        claim_output(out, "ingest", "hash1", overwrite=False)
    claim_output(out, "ingest", "hash1", overwrite=True)
    assert json.loads((out / "_run.json").read_text())["stage"] == "ingest"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FgdataError, match="not written by fgdata"):
        claim_output(foreign, "ingest", "h", overwrite=False)


@pytest.mark.slow
def test_wheel_ships_schemas_and_prompts(tmp_path):
    """prompts/ and schemas/ must be found from an installed wheel, not only from a checkout."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
    )
    (wheel,) = tmp_path.glob("fgdata-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pipeline/_resources/schemas/phrases.json" in names
    assert "pipeline/_resources/prompts/README.md" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = "from pipeline.core.resources import resource_dir; print(resource_dir('schemas'))"
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)}, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(target / "pipeline" / "_resources" / "schemas")


def test_a_dataset_of_fgdata_0_1_is_read_as_input_and_never_resumed_as_output(tmp_path):
    """fgdata 0.1 wrote its shards at the top of OUT (before `train/`). Such a dataset is still an
    input, but resuming it as an output would mix two layouts: refused, and --overwrite redoes it."""
    old = tmp_path / "old"
    claim_output(old, "phrases", "h", overwrite=False)
    write_shard(old, "part-00000.parquet", conform([PHRASE_ROW], "phrases"), "phrases", [], {"rows_in": 1})
    (old / "train" / "part-00000.parquet").rename(old / "part-00000.parquet")
    (old / "train").rmdir()
    assert [p.name for p in list_shards(old)] == ["part-00000.parquet"]
    assert read_shard(list_shards(old)[0]).to_pylist() == [PHRASE_ROW]
    with pytest.raises(FgdataError, match="written by fgdata 0.1"):
        claim_output(old, "phrases", "h", overwrite=False)
    assert (old / "part-00000.parquet").exists()  # the refusal deleted nothing
    claim_output(old, "phrases", "h", overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == ["_run.json"]
