"""The report and export commands on an object store: `fgdata report`, `audit sample`, `audit score`
and `hierarcaps export` given an s3:// dataset on moto's S3 server give exactly what they give for
the same dataset on disk (the page, the CSV, the scores), read its lineage and images from the
store, and read a shard by exact ranges (its footer and the columns and row groups used), never whole."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from object_store import bucket, put_object, s3_server  # noqa: F401 (fixtures)

from pipeline.core import storage
from pipeline.core.schemas import conform
from pipeline.core.shards import DATA_DIR, MANIFEST_FILE, REJECTS_DIR, read_json, shard_name, write_json
from pipeline.datasets.datacard import DATACARD_FILE
from pipeline.datasets.hierarcaps_csv import write_official_csv
from pipeline.datasets.synthetic_world import write_world
from pipeline.reports.audit import draw_sample, render_audit_page, score_audit
from pipeline.reports.html import render_report

REJECTS = [  # rejected keys are images of the world, so the rejects table shows their thumbnails
    {"key": "world-000001", "reason": "no_region", "detail": "no phrase grounded above 0.3", "source": "x"},
    {"key": "world-000002", "reason": "no_region", "detail": "no phrase grounded above 0.3", "source": "x"},
    {"key": "world-000004", "reason": "bad_caption", "detail": "<b>not bold</b>", "source": "x"},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """images, fggrn (with rejects) and hierarcaps, on disk; manifests name their inputs absolutely."""
    root = tmp_path_factory.mktemp("world").resolve()
    write_world(root, 30, seed=3, rows_per_shard=12)  # 3 shards of each kind
    pq.write_table(conform(REJECTS, "rejects"), root / "fggrn" / REJECTS_DIR / shard_name(0))
    fggrn = read_json(root / "fggrn" / MANIFEST_FILE)
    write_json(root / "fggrn" / MANIFEST_FILE, {**fggrn, "stage": "negatives", "rows_in": 33, "rows_rejected": 3})
    return root


def _upload(root: Path, uri: str) -> str:
    """The world copied under `uri`, its manifests' lineage pointing at the copies, so that nothing
    of the local world can be read through the store's datasets."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == MANIFEST_FILE:
            data = data.replace(str(root).encode(), uri.encode())
        put_object(f"{uri}/{path.relative_to(root).as_posix()}", data)
    return uri


def _local(page: str, root: Path, uri: str) -> str:
    return page.replace(uri, str(root))


@pytest.mark.parametrize("kind", ["fggrn", "hierarcaps"])
def test_report_on_s3_is_the_local_report(world, bucket, kind):
    uri = _upload(world, f"{bucket}/world")
    local, local_summary = render_report(world / kind, gallery=6, examples=2)
    remote, remote_summary = render_report(f"{uri}/{kind}", gallery=6, examples=2)
    assert f"<code>{uri}/{kind}</code>" in remote and f"{uri}/images" in remote  # the store's lineage, not the disk's
    assert _local(remote, world, uri) == local
    assert {**remote_summary, "seconds": 0} == {**local_summary, "seconds": 0}
    if kind == "fggrn":  # thumbnails came from the images dataset on the store, for the gallery and the rejects
        assert remote.count('class="box"') >= 6 and remote.count("<image href=\"data:image/jpeg") == 6
        rejects = remote.split("<h2>Rejects by reason</h2>")[1].split("<h2>")[0]
        assert "<td>no_region</td><td class='num'>2</td>" in rejects and rejects.count('<img class="thumb"') == 3
        funnel = remote.split("<h2>Funnel</h2>")[1].split("<h2>")[0]
        assert "no_region 2, bad_caption 1" in funnel and "9.1%" in funnel  # 3 of 33


def test_report_reads_footers_and_sampled_columns_not_whole_shards(bucket, tmp_path, monkeypatch):
    """An images dataset of 4 shards x 10 row groups, each row an incompressible 100 kB image: the
    report samples 10 row groups and reads no image bytes (gallery 0), so it fetches the 4 footers
    and a few small columns, a sliver of the 16 MB. The store's default read-ahead (50 MB past
    every read) would fetch each shard from its first group read to its end."""
    dataset = tmp_path / "big"
    (dataset / DATA_DIR).mkdir(parents=True)
    for shard in range(4):
        rows = [{"key": f"k{shard}-{i:03d}", "image": os.urandom(100_000), "width": 8, "height": 8, "format": "PNG",
                 "short_caption": f"caption {shard} {i}", "source": "x"} for i in range(40)]
        pq.write_table(conform(rows, "images"), dataset / DATA_DIR / shard_name(shard), row_group_size=4)
    write_json(dataset / MANIFEST_FILE, {"stage": "ingest", "kind": "images", "inputs": []})
    uri = _upload(tmp_path, f"{bucket}/data")
    total = sum(p.stat().st_size for p in (dataset / DATA_DIR).iterdir())

    from s3fs.core import S3File

    fetched = []
    original = S3File._fetch_range

    def counting(self, start, end):
        data = original(self, start, end)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(S3File, "_fetch_range", counting)
    page, summary = render_report(f"{uri}/big", sample=40, gallery=0)
    assert (summary["rows"], summary["sampled"]) == (160, 40) and "(10 of 40 row groups chosen" in page
    assert 0 < sum(fetched) < total / 20, (sum(fetched), total)


def test_audit_sample_on_s3_is_the_local_sample(world, bucket):
    uri = _upload(world, f"{bucket}/world")
    assert draw_sample(f"{uri}/fggrn", 24, seed=1) == draw_sample(world / "fggrn", 24, seed=1)
    local, local_summary = render_audit_page(world / "fggrn", 24, seed=1)
    remote, remote_summary = render_audit_page(f"{uri}/fggrn", 24, seed=1)
    # the sample id hashes the dataset's location: the one thing that differs, apart from the location
    assert remote_summary["sample_id"] != local_summary["sample_id"] and f'"dataset": "{uri}/fggrn"' in remote
    assert _local(remote, world, uri).replace(remote_summary["sample_id"], local_summary["sample_id"]) == local
    assert remote_summary["images"] == local_summary["images"] == 24  # every crop from the images dataset on the store
    assert {**remote_summary, "seconds": 0, "sample_id": ""} == {**local_summary, "seconds": 0, "sample_id": ""}


def _verdicts(dataset: str, items: list[dict], strata: dict) -> dict:
    """The page's download, judged by a fixed rule: every third candidate invalid, every seventh unsure."""
    judged = [{"id": item["id"], "stratum": item["stratum"], "verdict": "unsure" if n % 7 == 6 else "invalid" if n % 3 == 2 else "valid"}
              for n, item in enumerate(items)]
    return {"fgdata_audit": 1, "sample_id": "s", "dataset": dataset, "kind": "fggrn", "seed": 0, "strata": strata, "items": judged}


def test_audit_score_on_s3_records_the_local_scores_in_the_stores_manifest(world, bucket, tmp_path):
    uri = _upload(world, f"{bucket}/world")
    local_dataset = tmp_path / "fggrn"
    shutil.copytree(world / "fggrn", local_dataset)
    _, items, strata = draw_sample(local_dataset, 30, seed=0)
    (tmp_path / "local.json").write_text(json.dumps(_verdicts(str(local_dataset), items, strata)))
    put_object(f"{uri}/verdicts.json", json.dumps(_verdicts(f"{uri}/fggrn", items, strata)).encode())

    local, _ = score_audit(tmp_path / "local.json")
    remote, where = score_audit(f"{uri}/verdicts.json")  # the dataset is the one the verdicts name: on the store
    assert str(where) == f"{uri}/fggrn" and remote["verdicts_file"] == f"{uri}/verdicts.json"
    apart = ("verdicts_file", "sampled_from", "scored_at")
    assert {k: v for k, v in remote.items() if k not in apart} == {k: v for k, v in local.items() if k not in apart}
    assert remote["n"] > 0 and 0 < remote["valid_rate"] < 1
    stored = read_json(f"{uri}/fggrn/{MANIFEST_FILE}")
    assert stored["audit"] == json.loads(json.dumps(remote)) and stored["rows_rejected"] == 3  # the rest of the manifest kept
    card = storage.location(f"{uri}/fggrn/{DATACARD_FILE}").read_text()
    assert "## Audit" in card and f'"valid_rate": {remote["valid_rate"]}' in card
    assert "audit" not in read_json(world / "fggrn" / MANIFEST_FILE)  # the local world was not touched


@pytest.mark.parametrize("layout", ["train", "test"])
def test_hierarcaps_export_from_s3_is_byte_equal(world, bucket, tmp_path, layout):
    uri = _upload(world, f"{bucket}/world")
    local = write_official_csv(world / "hierarcaps", tmp_path / "local" / "out.csv", layout)
    remote = write_official_csv(f"{uri}/hierarcaps", tmp_path / "remote" / "out.csv", layout)
    assert (tmp_path / "remote" / "out.csv").read_bytes() == (tmp_path / "local" / "out.csv").read_bytes()
    assert remote["written"] == local["written"] == 30
    card = (tmp_path / "remote" / f"out.csv.{DATACARD_FILE}").read_text()
    assert f"from {uri}/hierarcaps:" in card
    assert _local(card, world, uri) == (tmp_path / "local" / f"out.csv.{DATACARD_FILE}").read_text()


def test_cli_reads_every_report_command_from_s3(world, bucket, tmp_path):
    """Typer's Path would turn s3://b/x into s3:/b/x, a local path: each command takes the URI as text."""
    uri = _upload(world, f"{bucket}/world")
    result = run_cli("report", f"{uri}/fggrn", "--out", str(tmp_path / "r.html"))
    assert result.returncode == 0, result.stderr
    assert "30 rows" in result.stdout and f"<code>{uri}/fggrn</code>" in (tmp_path / "r.html").read_text()

    result = run_cli("audit", "sample", f"{uri}/hierarcaps", "--n", "8", "--out", str(tmp_path / "a.html"))
    assert result.returncode == 0, result.stderr
    assert "8 hierarcaps candidates from 4 strata" in result.stdout

    _, items, strata = draw_sample(f"{uri}/fggrn", 10, seed=0)
    verdicts = _verdicts("elsewhere", items, strata)  # --dataset decides where the score goes
    put_object(f"{uri}/v.json", json.dumps(verdicts).encode())
    result = run_cli("audit", "score", f"{uri}/v.json", "--dataset", f"{uri}/fggrn")
    assert result.returncode == 0, result.stderr
    assert f"recorded in {uri}/fggrn/{MANIFEST_FILE}" in result.stdout
    judged = sum(item["verdict"] != "unsure" for item in verdicts["items"])
    assert read_json(f"{uri}/fggrn/{MANIFEST_FILE}")["audit"]["n"] == judged == 9

    result = run_cli("hierarcaps", "export", f"{uri}/hierarcaps", str(tmp_path / "train.csv"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "train.csv").read_text().count("\n") == 31  # the header and 30 chains
