"""A run owns its output: a recipe never writes over its SOURCE, --overwrite never deletes a file
fgdata did not write (inside its own folders too), one run at a time holds OUT (a lock on disk, a
lease object on a store, both taken over once their run is dead), and an unfinished output says so."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import pytest
import yaml
from conftest import assert_dataset_invariants, make_config, run_cli, write_caption_shard
from gcs_store import gcs_bucket, gcs_server  # noqa: F401 (fixtures)
from object_store import all_objects, bucket, put_object, s3_server  # noqa: F401 (fixtures)

from pipeline.core import storage
from pipeline.core.shards import LOCK_FILE, RUN_FILE, OutputLock, claim_output, hold_output, write_json
from pipeline.datasets.info import describe_dataset
from pipeline.errors import FgdataError
from pipeline.recipes import load_recipe
from pipeline.recipes.run import run_recipe
from pipeline.runner import run_stage
from pipeline.stages.fggrn.phrases import PhrasesStage

STEPS = [{"name": "images", "stage": "ingest", "input": "SOURCE"}, {"name": "phrases", "stage": "phrases", "input": "images"}]


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def captions(root, shards: int = 1):
    for shard in range(shards):
        write_caption_shard(root / f"part-{shard:05d}.parquet", [{"key": f"{shard}-{i}", "short_caption": "a red car"} for i in range(3)])
    return root


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def lock_record(**fields) -> dict:
    record = {"host": platform.node(), "pid": os.getpid(), "since": "2026-01-01T00:00:00+00:00", "refreshed": time.time(), "token": "other-run"}
    return {**record, **fields}


# --- 1. a recipe's SOURCE is never one of its outputs -------------------------------------


@pytest.mark.parametrize("where", ["a_step_that_does_not_read_it", "inside_a_step", "out_itself", "inside_out", "holding_out"])
def test_recipe_source_overlapping_any_output_is_refused_and_nothing_deleted(tmp_path, where):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"steps": STEPS}))
    out = tmp_path / "run"
    claim_output(out / "phrases", "phrases", "h", overwrite=False)  # an earlier run's output, fgdata's own
    captions(out / "phrases" / "train")
    source = {
        "a_step_that_does_not_read_it": out / "phrases",
        "inside_a_step": out / "phrases" / "train",
        "out_itself": out,
        "inside_out": out / "mine",
        "holding_out": tmp_path,
    }[where]
    source.mkdir(parents=True, exist_ok=True)
    before = snapshot(tmp_path)
    for overwrite in (True, False):
        with pytest.raises(FgdataError, match="the input") as refused:
            run_recipe(load_recipe(str(recipe)), source, out, overrides=["run.executor=local", "run.progress=false"], overwrite=overwrite)
        assert "\n" not in str(refused.value)
    assert snapshot(tmp_path) == before


def test_cli_run_into_its_own_source_is_one_line_exit_2(tmp_path):
    out = tmp_path / "copy"
    claim_output(out / "captions", "recaption", "h", overwrite=False)
    captions(out / "captions" / "train")
    before = snapshot(out)
    result = run_cli("run", "fggrn-demo", str(out / "captions"), str(out), "--overwrite", timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert snapshot(out) == before


# --- 2. --overwrite never deletes a user's file inside fgdata's folders --------------------


@pytest.mark.parametrize(
    "foreign",
    ["train/notes.txt", "_stats/mine.csv", "_rejects/extra.parquet", "_done/keep/me.txt", "train/part-00000 copy.parquet", "_download/part-00000/mine.txt", "_dedup_hashes/notes.txt"],
)
def test_overwrite_refuses_user_files_inside_fgdata_folders(tmp_path, foreign):
    out = tmp_path / "out"
    claim_output(out, "phrases", "h", overwrite=False)
    captions(out / "train")
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_text("mine")
    before = snapshot(out)
    with pytest.raises(FgdataError, match=f"holds files fgdata did not write \\({foreign}\\)"):
        claim_output(out, "phrases", "h2", overwrite=True)
    assert snapshot(out) == before


def test_overwrite_still_replaces_what_fgdata_wrote_in_its_folders(tmp_path, ray_session):
    source = captions(tmp_path / "captions", shards=2)
    out = tmp_path / "phrases"
    run_stage(PhrasesStage(source), out, make_config())
    (out / "_done" / ".part-00000.parquet.done.tmp-1234abcd").write_text("a killed run's temporary file")
    summary = run_stage(PhrasesStage(source), out, make_config(), overwrite=True)
    assert (summary.shards_run, summary.rows_out) == (2, 6)
    assert_dataset_invariants(out)


def test_overwrite_deletes_download_staging_a_kill_left(tmp_path):
    out = tmp_path / "images"
    claim_output(out, "download", "h", overwrite=False)
    for name in ("_download/part-00000/attempt-0/00000.parquet", "_download/part-00000/attempt-0/00000/000000001.img", "_download/part-00001/.attempt-2.partial/00000/x.json"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"img2dataset's")
    claim_output(out, "download", "h2", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [RUN_FILE]


def test_overwrite_on_a_store_refuses_user_objects_inside_fgdata_prefixes(bucket):
    out = f"{bucket}/out"
    claim_output(out, "phrases", "h", overwrite=False)
    put_object(f"{out}/train/part-00000.parquet", b"fgdata's")
    put_object(f"{out}/train/notes.txt", b"mine")
    put_object(f"{out}/_stats/deep/mine.json", b"mine")
    before = all_objects(bucket)
    with pytest.raises(FgdataError, match=r"holds files fgdata did not write \(_stats/deep/mine.json, train/notes.txt\)"):
        claim_output(out, "phrases", "h2", overwrite=True)
    assert all_objects(bucket) == before


# --- 3. one run at a time holds an output ----------------------------------------------------


def test_a_second_run_is_refused_while_the_first_holds_the_output(tmp_path):
    source = captions(tmp_path / "captions", shards=2)
    out = tmp_path / "phrases"
    with hold_output(out):  # the first run, in this process
        holder = json.loads((out / LOCK_FILE).read_text())
        for extra in ([], ["--overwrite"]):
            result = run_cli("phrases", str(source), str(out), "--executor", "local", *extra, timeout=120)
            assert result.returncode == 2, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
            assert f"in use by another fgdata run (host {holder['host']}, pid {os.getpid()}, since {holder['since']})" in result.stderr
        assert json.loads((out / LOCK_FILE).read_text())["token"] == holder["token"]
        summary = run_stage(PhrasesStage(source), out, make_config())  # the first run goes on, inside its own hold
    assert (summary.shards_run, summary.rows_out) == (2, 6)
    assert_dataset_invariants(out)
    assert not (out / LOCK_FILE).exists()


# each holder is made when its test runs: a lock "refreshed just now" at collection is stale by the
# time a long test session reaches it
@pytest.mark.parametrize(
    ("make_holder", "taken"),
    [
        (lambda: lock_record(pid=dead_pid()), True),  # killed on this host
        (lambda: lock_record(host="elsewhere", refreshed=time.time() - 3600), True),  # another host's lease ran out
        (lambda: lock_record(host="elsewhere"), False),  # another host, refreshed just now
        (lambda: lock_record(), False),  # alive here (this very process, outside its hold)
    ],
    ids=["dead_pid_here", "lease_ran_out_elsewhere", "fresh_lease_elsewhere", "alive_here"],
)
def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path, make_holder, taken):
    holder = make_holder()
    source = captions(tmp_path / "captions")
    out = tmp_path / "phrases"
    out.mkdir()
    write_json(out / LOCK_FILE, holder)
    if taken:
        assert run_stage(PhrasesStage(source), out, make_config()).rows_out == 3
        assert not (out / LOCK_FILE).exists()
    else:
        with pytest.raises(FgdataError, match="in use by another fgdata run"):
            run_stage(PhrasesStage(source), out, make_config(), overwrite=True)
        assert json.loads((out / LOCK_FILE).read_text()) == holder
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_the_lock_is_released_on_error_and_interrupt(tmp_path, monkeypatch):
    source = captions(tmp_path / "captions")
    out = tmp_path / "phrases"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.runner.finish_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_stage(PhrasesStage(source), out, make_config())
    assert not (out / LOCK_FILE).exists()
    with pytest.raises(FgdataError, match="already holds output of stage 'phrases'"):
        run_stage(PhrasesStage(source), out, make_config("phrases.max_phrase_words=3"))
    assert not (out / LOCK_FILE).exists() and (out / RUN_FILE).exists()


def test_the_lease_is_refreshed_while_the_run_holds_it(tmp_path):
    lock = OutputLock(tmp_path / LOCK_FILE, stale_after=0.4)
    lock.acquire()
    try:
        first = json.loads((tmp_path / LOCK_FILE).read_text())["refreshed"]
        time.sleep(0.5)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["refreshed"] > first
        with pytest.raises(FgdataError, match="in use by another fgdata run"):  # never stale while refreshed
            OutputLock(tmp_path / LOCK_FILE, stale_after=0.4).acquire()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_recipe_holds_every_step_output(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"steps": STEPS}))
    source = tmp_path / "photos"
    source.mkdir()
    out = tmp_path / "run"
    claim_output(out / "images", "ingest", "h", overwrite=False)
    (out / "phrases").mkdir(parents=True)
    write_json(out / "phrases" / LOCK_FILE, lock_record(host="elsewhere"))
    before = snapshot(out)
    with pytest.raises(FgdataError, match=f"{out / 'phrases'} is in use by another fgdata run \\(host elsewhere"):
        run_recipe(load_recipe(str(recipe)), source, out, overrides=["run.executor=local", "run.progress=false"], overwrite=True)
    assert snapshot(out) == before


@pytest.mark.parametrize("store", ["bucket", "gcs_bucket"])
def test_one_lease_on_a_store_and_a_stale_one_taken_over(request, store):
    out = storage.location(f"{request.getfixturevalue(store)}/out")
    first = OutputLock(out / LOCK_FILE)
    first.acquire()
    second = OutputLock(out / LOCK_FILE)
    with pytest.raises(FgdataError, match=f"in use by another fgdata run \\(host {platform.node()}, pid {os.getpid()}"):
        second.acquire()
    with pytest.raises(FgdataError, match="in use by another fgdata run"):
        with hold_output(out):
            pass
    first.release()
    assert not (out / LOCK_FILE).exists()
    write_json(out / LOCK_FILE, lock_record(host="elsewhere", refreshed=time.time() - 3600))
    with hold_output(out):
        assert json.loads((out / LOCK_FILE).read_text())["host"] == platform.node()
        claim_output(out, "phrases", "h", overwrite=True)
    assert sorted(all_objects(str(out))) == [f"{str(out).split('://', 1)[1]}/{RUN_FILE}"]


# --- 4. an unfinished output says so ---------------------------------------------------------


def test_info_names_an_unfinished_output_incomplete(tmp_path, monkeypatch):
    source = captions(tmp_path / "captions", shards=3)
    out = tmp_path / "phrases"
    claim_output(out, "phrases", "h", overwrite=False)
    with pytest.raises(FgdataError, match="INCOMPLETE: 0 shards done"):
        describe_dataset(out)
    from pipeline.runner import run_shard

    def fail_second(stage, unit, *args, **kwargs):
        if unit.name == "part-00001.parquet":
            raise RuntimeError("killed")
        return run_shard(stage, unit, *args, **kwargs)

    monkeypatch.setattr("pipeline.runner.run_shard", fail_second)
    with pytest.raises(FgdataError, match="1 shard"):
        run_stage(PhrasesStage(source), out, make_config("run.max_retries=0"), overwrite=True)
    result = run_cli("info", str(out), timeout=120)
    assert result.returncode == 2
    assert "INCOMPLETE: 2 of 3 shards done" in result.stderr and "load" in result.stderr


def test_load_dataset_fails_on_an_unfinished_output_and_reads_it_whole_once_finished(tmp_path, monkeypatch):
    import datasets
    import pyarrow

    source = captions(tmp_path / "captions", shards=3)
    out = tmp_path / "phrases"
    from pipeline.runner import run_shard

    def fail_second(stage, unit, *args, **kwargs):
        if unit.name == "part-00001.parquet":
            raise RuntimeError("killed")
        return run_shard(stage, unit, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr("pipeline.runner.run_shard", fail_second)
        with pytest.raises(FgdataError):
            run_stage(PhrasesStage(source), out, make_config("run.max_retries=0"))
    with pytest.raises(pyarrow.ArrowInvalid):  # not 6 of the 9 rows as if they were the dataset
        datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "cache"))
    summary = run_stage(PhrasesStage(source), out, make_config())
    assert (summary.shards_run, summary.shards_skipped) == (1, 2)
    loaded = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "cache"))
    assert sorted(loaded["train"]["key"]) == sorted(f"{s}-{i}" for s in range(3) for i in range(3))
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"part-0000{s}.parquet" for s in range(3)]
