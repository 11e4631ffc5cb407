"""Every fgdata output opens with Hugging Face `datasets` and gives exactly its shard rows: no reject
row, no metadata file read as data, no row twice. Datasets are built in-test with `write_shard`
(the writer every stage uses), so each holds what a real run leaves: rejects, stats, markers, the
run record, the manifest and the data card."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.schemas import conform, load_schema
from pipeline.core.shards import MANIFEST_FILE, claim_output, read_rejects, shard_name, write_json, write_shard
from pipeline.datasets.datacard import write_datacard
from pipeline.datasets.fgclip_export import JSON_FILE, export_fgclip
from pipeline.datasets.hierarcaps_csv import write_official_csv
from pipeline.datasets.synthetic_world import write_world

KINDS = ("images", "captions", "phrases", "regions", "fggrn", "hierarcaps")


def _value(arrow_type: pa.DataType, row: int):
    """A valid value of `arrow_type`, different for every row where the type allows."""
    if pa.types.is_struct(arrow_type):
        return {field.name: _value(field.type, row) for field in arrow_type}
    if pa.types.is_list(arrow_type):
        return [_value(arrow_type.value_type, row)]
    if pa.types.is_string(arrow_type):
        return f"v{row}"
    if pa.types.is_binary(arrow_type):
        return f"b{row}".encode()
    if pa.types.is_boolean(arrow_type):
        return row % 2 == 0
    if pa.types.is_integer(arrow_type):
        return row
    if pa.types.is_floating(arrow_type):
        return row + 0.5
    raise AssertionError(f"no test value for {arrow_type}")


def _rows(kind: str, keys: list[str]) -> list[dict]:
    schema = load_schema(kind)
    rows = [{field.name: _value(field.type, i) for field in schema.arrow} for i, _ in enumerate(keys)]
    return [row | {schema.key: key} for row, key in zip(rows, keys)]


def _write_dataset(out: Path, kind: str) -> list[str]:
    """Three shards (the last one all rejects, so an empty Parquet file) plus every metadata file a
    run writes. Returns the output keys in shard order."""
    claim_output(out, f"test-{kind}", "settings", False)
    shards = [(["a", "b"], ["r1"]), (["c"], ["r2", "r3"]), ([], ["r4"])]
    for index, (keys, rejected) in enumerate(shards):
        rejects = [{"key": k, "reason": "test_reason", "detail": "rejected on purpose", "source": "test"} for k in rejected]
        stats = {"rows_in": len(keys) + len(rejected), "rows_out": len(keys), "rows_rejected": len(rejected), "counters": {}}
        write_shard(out, shard_name(index), conform(_rows(kind, keys), kind), kind, rejects, stats, marker="m")
    manifest = {"stage": f"test-{kind}", "kind": kind, "inputs": [], "rows_out": 3, "rows_rejected": 4}
    write_datacard(out, manifest)
    write_json(out / MANIFEST_FILE, manifest)
    return [k for keys, _ in shards for k in keys]


def load_like_the_readme(dataset: Path, cache: Path, **options):
    """The call README.md gives for opening an output: the directory alone, no file pattern."""
    import datasets

    return datasets.load_dataset("parquet", data_dir=str(dataset), cache_dir=str(cache), **options)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_opens_with_data_dir_alone_as_exactly_its_shard_rows(tmp_path, kind):
    """`load_dataset("parquet", data_dir=OUT)` gives one split, `train`, holding exactly the shard
    rows: the rejects (Parquet too, another schema), stats, markers, run record, manifest and data
    card beside them are not read as data."""
    out = tmp_path / kind
    keys = _write_dataset(out, kind)
    assert len(read_rejects(out)) == 4 and (out / "DATACARD.md").exists() and (out / "_run.json").exists()

    splits = load_like_the_readme(out, tmp_path / ".hf-cache")
    assert list(splits) == ["train"]
    loaded = splits["train"]
    shards = pa.concat_tables([pq.read_table(p) for p in sorted((out / "train").glob("part-*.parquet"))])
    assert loaded.column_names == load_schema(kind).arrow.names
    assert loaded[load_schema(kind).key] == keys  # no reject row, nothing twice, shard order kept
    assert loaded.data.table.cast(shards.schema).equals(shards)  # every value as written, nested ones too


def test_the_directory_path_alone_and_the_rejects_open_too(tmp_path):
    """`load_dataset(OUT)` (a folder path, the builder inferred) reads the same rows, and the rejects
    folder opens on its own with its own schema."""
    import datasets

    out = tmp_path / "regions"
    keys = _write_dataset(out, "regions")
    loaded = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / ".hf-cache"))
    assert loaded["key"] == keys
    rejects = load_like_the_readme(out / "_rejects", tmp_path / ".hf-cache", split="train")
    assert sorted(rejects["key"]) == ["r1", "r2", "r3", "r4"] and set(rejects["reason"]) == {"test_reason"}


def test_exports_open_with_the_datasets_json_and_csv_builders(tmp_path):
    import datasets

    world = write_world(tmp_path / "world", 6, seed=1)
    export = tmp_path / "fgclip"
    summary = export_fgclip(world["fggrn"], export, world["images"], negatives_needed=2, progress=False)
    items = json.loads((export / JSON_FILE).read_text())
    loaded = datasets.load_dataset("json", data_files=str(export / JSON_FILE), split="train", cache_dir=str(tmp_path / ".hf-cache"))
    assert summary["items"] == len(items) == len(loaded) > 0
    assert loaded["f_path"] == [i["f_path"] for i in items]
    assert [[b["short_expr"] for b in row["bbox_info"]] for row in loaded] == [[b["short_expr"] for b in i["bbox_info"]] for i in items]

    csv_path = tmp_path / "hierarcaps_train.csv"
    written = write_official_csv(world["hierarcaps"], csv_path, "train")["written"]
    with csv_path.open(newline="", encoding="utf-8") as handle:
        expected = list(csv.DictReader(handle))
    chains = datasets.load_dataset("csv", data_files=str(csv_path), split="train", cache_dir=str(tmp_path / ".hf-cache"))
    assert written == len(chains) == len(expected) > 0 and chains.to_list() == expected
