import io
import json
import os
import signal
import stat
import tarfile
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_IMAGES, assert_dataset_invariants, image_bytes, make_config, read_rows
from test_images import png_with_header_size

from pipeline.core.shards import read_json, read_rejects
from pipeline.core.sources import MAX_SIDECAR_BYTES
from pipeline.errors import FgdataError
from pipeline.runner import run_stage
from pipeline.stages.fggrn.ingest import IngestStage

pytestmark = pytest.mark.usefixtures("ray_session")


def rejects_by_key(dataset):
    return {r["key"]: r["reason"] for r in read_rejects(dataset).to_pylist()}


def test_sample_folder_ingests_every_real_photo_and_rejects_the_broken_ones(tmp_path):
    out = tmp_path / "images"
    summary = run_stage(IngestStage(SAMPLE_IMAGES), out, make_config("ingest.rows_per_shard=8"))
    photos = {p.stem for p in SAMPLE_IMAGES.glob("*.jpg")}
    assert_dataset_invariants(out, expected_keys=photos)
    assert (summary.shards_total, summary.rows_in, summary.rows_rejected) == (3, 19, 2)
    assert rejects_by_key(out) == {"broken_truncated": "decode_error", "broken_not_an_image": "not_an_image"}
    rows = {r["key"]: r for r in read_rows(out)}
    assert rows["astronaut"]["image"] == (SAMPLE_IMAGES / "astronaut.jpg").read_bytes()  # bytes kept as is
    assert (rows["coffee"]["width"], rows["coffee"]["height"], rows["coffee"]["format"]) == (512, 341, "JPEG")
    assert rows["coffee"]["short_caption"].endswith("wooden table & a blurred background")  # &amp; decoded
    assert rows["chelsea"]["short_caption"].startswith("A tabby cat")  # from the .json sidecar
    manifest = read_json(out / "_manifest.json")
    assert manifest["stage"] == "ingest" and manifest["config"]["ingest"]["rows_per_shard"] == 8
    assert manifest["counters"]["rejected_decode_error"] == 1 and manifest["inputs"][0]["path"] == str(SAMPLE_IMAGES)


def test_bad_files_and_sidecars_in_a_folder_become_rejects(tmp_path):
    source = tmp_path / "photos"
    (source / "nested").mkdir(parents=True)
    (source / "good.jpg").write_bytes(image_bytes())
    (source / "good.txt").write_text("<p>A red\x00 square</p>\n")
    (source / "nested" / "good.png").write_bytes(image_bytes(fmt="PNG"))
    (source / "zero.jpg").write_bytes(b"")
    (source / "huge.png").write_bytes(png_with_header_size(20000, 20000))
    (source / "badjson.jpg").write_bytes(image_bytes())
    (source / "badjson.json").write_text("{not json")
    (source / "twin.jpg").write_bytes(image_bytes())
    (source / "twin.png").write_bytes(image_bytes(fmt="PNG"))
    (source / "nocaption.webp").write_bytes(image_bytes(fmt="WEBP"))
    out = tmp_path / "out"
    run_stage(IngestStage(source), out, make_config())
    assert_dataset_invariants(out, expected_keys={"good", "nested/good", "zero", "huge", "badjson", "twin", "nocaption"})
    assert rejects_by_key(out) == {
        "zero": "empty_file",
        "huge": "image_too_large",
        "badjson": "bad_caption_sidecar",
        "twin": "duplicate_key",
    }
    rows = {r["key"]: r for r in read_rows(out)}
    assert rows["good"]["short_caption"] == "A red square"
    assert rows["nocaption"]["short_caption"] is None and rows["nocaption"]["format"] == "WEBP"
    assert rows["twin"]["format"] == "JPEG"  # the first in sorted order keeps the key


def test_img2dataset_files_layout_with_failed_downloads(tmp_path):
    source = tmp_path / "i2d"
    (source / "00000").mkdir(parents=True)
    for key in ("000000000", "000000001"):
        (source / "00000" / f"{key}.jpg").write_bytes(image_bytes())
        (source / "00000" / f"{key}.txt").write_text(f"caption {key}")
        (source / "00000" / f"{key}.json").write_text(json.dumps({"key": key, "caption": f"caption {key}"}))
    pq.write_table(
        pa.table(
            {
                "key": ["000000000", "000000001", "000000002"],
                "caption": ["caption 000000000", "caption 000000001", "caption 000000002"],
                "status": ["success", "success", "failed_to_download"],
                "error_message": [None, None, "HTTP 404"],
            }
        ),
        source / "00000.parquet",
    )
    out = tmp_path / "out"
    run_stage(IngestStage(source), out, make_config())
    assert_dataset_invariants(out, expected_keys={"000000000", "000000001", "000000002"})
    assert read_rejects(out).to_pylist()[0] | {"source": None} == {
        "key": "000000002", "reason": "download_failed", "detail": "img2dataset could not download it: HTTP 404", "source": None,
    }
    assert [r["short_caption"] for r in read_rows(out)] == ["caption 000000000", "caption 000000001"]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars(tmp_path):
    source = tmp_path / "wds"
    source.mkdir()
    with tarfile.open(source / "00000.tar", "w") as tar:
        add_member(tar, "000000000.jpg", image_bytes())
        add_member(tar, "000000000.txt", b"a red square")
        add_member(tar, "000000001.png", image_bytes(fmt="PNG"))
        add_member(tar, "000000001.json", json.dumps({"caption": "a png square"}).encode())
        add_member(tar, "000000002.jpg", image_bytes((300, 300))[:500])
    with tarfile.open(source / "00001.tar", "w") as tar:
        add_member(tar, "000001000.jpg", image_bytes())
    out = tmp_path / "out"
    run_stage(IngestStage(source, "webdataset"), out, make_config("ingest.rows_per_shard=2"))
    assert_dataset_invariants(out, expected_keys={"000000000", "000000001", "000000002", "000001000"})
    assert rejects_by_key(out) == {"000000002": "decode_error"}
    rows = {r["key"]: r for r in read_rows(out)}
    assert rows["000000001"]["short_caption"] == "a png square" and rows["000000001"]["format"] == "PNG"
    assert rows["000001000"]["source"].endswith("00001.tar::000001000.jpg")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tables_of_paths_and_captions(tmp_path, suffix):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "img" / "b.png").write_bytes(image_bytes(fmt="PNG"))
    frame = {"image_path": ["img/a.jpg", "img/b.png", "img/missing.jpg", ""], "caption": ["first", "second", "third", "fourth"]}
    table_path = tmp_path / f"list{suffix}"
    if suffix == ".csv":
        pacsv.write_csv(pa.table(frame), table_path)
    else:
        pq.write_table(pa.table(frame), table_path)
    out = tmp_path / "out"
    run_stage(IngestStage(table_path), out, make_config())
    assert_dataset_invariants(out, expected_keys={"a", "b", "missing", "row-3"})
    assert rejects_by_key(out) == {"missing": "missing_file", "row-3": "missing_image_path"}
    assert {r["key"]: r["short_caption"] for r in read_rows(out)} == {"a": "first", "b": "second"}


def test_unusable_sources_stop_before_any_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FgdataError, match="does not exist"):
        run_stage(IngestStage(tmp_path / "nowhere"), out, make_config())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FgdataError, match="holds no images"):
        run_stage(IngestStage(tmp_path / "empty"), out, make_config())
    bad_table = tmp_path / "list.csv"
    bad_table.write_text("url,caption\nhttp://x/a.jpg,a\n")
    with pytest.raises(FgdataError, match="no image path column"):
        run_stage(IngestStage(bad_table), out, make_config())
    assert not out.exists()


# --- hostile inputs: every candidate image is a row or a reject with a reason, nothing hangs ---


@contextmanager
def deadline(seconds: int):
    """Fails the test instead of hanging it (opening a FIFO blocks until a writer comes)."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds}s: something blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def ingest_in_process(source, fmt="auto", *overrides):
    """plan + process for every unit without Ray: rows and rejects (lists of dicts)."""
    stage, config = IngestStage(source, fmt), make_config(*overrides)
    with deadline(60):
        results = [stage.process(unit, config) for unit in stage.plan(config)]
    return [row for r in results for row in r.table.to_pylist()], [reject for r in results for reject in r.rejects]


def reasons(rejects):
    return {r["key"]: r["reason"] for r in rejects}


def test_file_names_that_are_not_utf8_are_kept_with_escaped_keys(tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    odd = os.path.join(os.fsencode(source), b"caf\xe9")  # Latin-1 bytes: not UTF-8
    with open(odd + b".jpg", "wb") as f:
        f.write(image_bytes())
    with open(odd + b".txt", "wb") as f:
        f.write(b"a red cafe")
    out = tmp_path / "out"
    run_stage(IngestStage(source), out, make_config())  # the Parquet write used to fail on the name
    assert_dataset_invariants(out, expected_keys={"caf\\xe9"})
    [row] = read_rows(out)
    assert row["key"] == "caf\\xe9" and row["short_caption"] == "a red cafe" and row["image"] == image_bytes()
    # the escapes turn back into the file's own bytes
    assert row["source"].encode().decode("unicode_escape").encode("latin-1") == odd + b".jpg"
    assert read_json(out / "_manifest.json")["counters"]["names_escaped"] == 1
    # a name spelling the escape literally cannot take the same key: one of the two is rejected
    (source / "caf\\xe9.png").write_bytes(image_bytes(fmt="PNG"))
    rows, rejects = ingest_in_process(source)
    assert [r["key"] for r in rows] == ["caf\\xe9"] and reasons(rejects) == {"caf\\xe9": "duplicate_key"}


def test_caption_sidecars_that_cannot_be_read_reject_their_image_and_never_block(tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    sidecars = {
        "nested": ("json", "[" * 100_000),
        "number": ("json", json.dumps({"caption": 42})),
        "listed": ("json", json.dumps({"caption": ["a", "b"]})),
        "array": ("json", json.dumps(["a caption"])),
        "latin1": ("txt", b"caf\xe9"),
        "oversized": ("txt", "x" * (MAX_SIDECAR_BYTES + 1)),
        "null": ("json", json.dumps({"caption": None, "text": "from the next field"})),
        "nullonly": ("json", json.dumps({"caption": None})),
        "upper": ("TXT", "an upper-case sidecar"),
    }
    for name, (ext, content) in sidecars.items():
        (source / f"{name}.jpg").write_bytes(image_bytes())
        sidecar = source / f"{name}.{ext}"
        sidecar.write_bytes(content) if isinstance(content, bytes) else sidecar.write_text(content)
    (source / "folder.jpg").write_bytes(image_bytes())
    (source / "folder.txt").mkdir()
    (source / "fifo.jpg").write_bytes(image_bytes())
    os.mkfifo(source / "fifo.txt")
    (source / "link.jpg").write_bytes(image_bytes())
    (source / "link.txt").symlink_to(source / "fifo.txt")  # a link to a FIFO is no file either
    rows, rejects = ingest_in_process(source)
    bad = {"nested", "number", "listed", "array", "latin1", "oversized", "folder", "fifo", "link"}
    assert reasons(rejects) == {key: "bad_caption_sidecar" for key in bad}
    details = {r["key"]: r["detail"] for r in rejects}
    assert "nests too deeply" in details["nested"] and "'caption' is a int" in details["number"]
    assert "is a directory" in details["folder"] and "is a FIFO" in details["fifo"] and "is a FIFO" in details["link"]
    assert f"larger than {MAX_SIDECAR_BYTES}" in details["oversized"]
    captions = {r["key"]: r["short_caption"] for r in rows}
    assert captions == {"null": "from the next field", "nullonly": None, "upper": "an upper-case sidecar"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_sidecar_rejects_its_image(tmp_path):
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "a.txt").write_text("secret")
    (tmp_path / "a.txt").chmod(0)
    rows, rejects = ingest_in_process(tmp_path)
    assert not rows and reasons(rejects) == {"a": "bad_caption_sidecar"} and "Permission denied" in rejects[0]["detail"]


def test_a_sidecar_that_cannot_be_opened_rejects_its_image(tmp_path, monkeypatch):
    # The same path as a permission error, for when the tests run as root.
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "a.txt").write_text("secret")
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if os.fspath(path).endswith("a.txt"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    rows, rejects = ingest_in_process(tmp_path)
    assert not rows and reasons(rejects) == {"a": "bad_caption_sidecar"} and "Permission denied" in rejects[0]["detail"]


def test_odd_entries_in_a_folder_are_rejects_or_rows(tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    (source / "good.jpg").write_bytes(image_bytes())
    (source / ".jpg").write_bytes(image_bytes())  # a name that is only a suffix
    (source / "a.b.jpg").write_bytes(image_bytes())
    (source / "good-link.jpg").symlink_to(source / "good.jpg")
    (source / "broken.jpg").symlink_to(source / "nowhere.jpg")
    (source / "loop.jpg").symlink_to(source / "loop.jpg")
    os.mkfifo(source / "pipe.jpg")
    (source / "dir.png").mkdir()
    (source / "dir.png" / "inside.png").write_bytes(image_bytes(fmt="PNG"))
    (source / "twin.png").write_bytes(image_bytes(fmt="PNG"))
    (source / "twin.jpg").mkdir()  # a broken twin never takes the key from the good one
    (source / "linked-folder").symlink_to(source / "dir.png")  # not entered: no loops, no escape
    expected = {
        "broken": "missing_file", "loop": "unreadable_file", "pipe": "not_a_file", "dir": "not_a_file", "twin": "duplicate_key",
    }
    if os.geteuid() == 0:
        os.mknod(source / "device.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
        expected["device"] = "not_a_file"
    rows, rejects = ingest_in_process(source)
    assert reasons(rejects) == expected
    assert {r["key"] for r in rows} == {"good", ".jpg", "a.b", "good-link", "dir.png/inside", "twin"}
    assert [r["format"] for r in rows if r["key"] == "twin"] == ["PNG"]
    assert "is a directory" in next(r["detail"] for r in rejects if r["key"] == "twin")


def test_img2dataset_row_marked_success_without_its_file_is_a_reject(tmp_path):
    source = tmp_path / "i2d"
    (source / "00000").mkdir(parents=True)
    (source / "00000" / "000000000.jpg").write_bytes(image_bytes())
    pq.write_table(
        pa.table({"key": ["000000000", "000000001", None], "status": ["success", "success", "failed_to_download"]}),
        source / "00000.parquet",
    )
    rows, rejects = ingest_in_process(source)
    assert [r["key"] for r in rows] == ["000000000"]
    assert reasons(rejects) == {"000000001": "missing_file", "00000-row-2": "download_failed"}


def write_tar(path, members: dict[str, bytes]) -> bytes:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            add_member(tar, name, data)
    return path.read_bytes()


def test_webdataset_members_are_each_a_row_or_a_reject(tmp_path):
    source = tmp_path / "wds"
    source.mkdir()
    write_tar(
        source / "00000.tar",
        {
            "a.jpg": image_bytes(), "a.png": image_bytes(fmt="PNG"),  # two images under one key
            "b.left.jpg": image_bytes(), "b.txt": b"compound extension",
            "c.jpg": image_bytes(), "c.TXT": b"upper-case caption",
            "d.jpg": image_bytes(), "d.json": json.dumps({"caption": 7}).encode(),
        },
    )
    with tarfile.open(source / "00001.tar", "w") as tar:
        add_member(tar, "e.jpg", image_bytes())
        folder = tarfile.TarInfo("f.jpg")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    rows, rejects = ingest_in_process(source)
    assert {r["key"]: r["short_caption"] for r in rows} == {"a": None, "b": "compound extension", "c": "upper-case caption", "e": None}
    assert reasons(rejects) == {"a": "duplicate_key", "d": "bad_caption_sidecar", "f": "not_a_file"}


def test_a_damaged_tar_costs_only_its_own_members(tmp_path):
    source = tmp_path / "wds"
    source.mkdir()
    write_tar(source / "00000.tar", {"healthy.jpg": image_bytes()})
    whole = write_tar(tmp_path / "cut.tar", {"first.jpg": image_bytes(), "second.jpg": image_bytes(), "third.jpg": image_bytes()})
    second_ends = whole.index(image_bytes(), 1024) + len(image_bytes())  # the header after it is missing
    (source / "00001.tar").write_bytes(whole[: second_ends - 10])  # "second" is cut short
    (source / "00002.tar").write_bytes(b"not a tar at all")
    os.mkfifo(source / "00003.tar")
    header = bytearray(write_tar(tmp_path / "big.tar", {"big.jpg": image_bytes()}))
    header[124:136] = b"%011o\0" % (7 << 30)  # the header claims 7 GiB: never allocated
    header[148:156] = b"%06o\0 " % (sum(header[:148]) + 8 * 32 + sum(header[156:512]))
    (source / "00004.tar").write_bytes(bytes(header))
    rows, rejects = ingest_in_process(source, "webdataset")
    assert {r["key"] for r in rows} == {"healthy", "first"}
    assert reasons(rejects) == {
        "second": "unreadable_file", "00001.tar": "unreadable_tar", "00002.tar": "unreadable_tar", "00003.tar": "unreadable_tar",
        "big": "unreadable_file", "00004.tar": "unreadable_tar",
    }
    assert "of the member's 7516192768 bytes" in next(r["detail"] for r in rejects if r["key"] == "big")
    assert "is a FIFO" in next(r["detail"] for r in rejects if r["key"] == "00003.tar")


def test_table_nulls_never_become_nan_and_fifo_paths_are_not_opened(tmp_path):
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "b.jpg").write_bytes(image_bytes())
    os.mkfifo(tmp_path / "pipe.jpg")
    table = pa.table(
        {
            "key": [None, "k-b", None, "k-pipe", None],
            "image_path": ["a.jpg", "b.jpg", None, "pipe.jpg", str(tmp_path)],
            "caption": ["first", None, "third", "fourth", "fifth"],
        }
    )
    pq.write_table(table, tmp_path / "list.parquet")
    rows, rejects = ingest_in_process(tmp_path / "list.parquet")
    assert {r["key"]: r["short_caption"] for r in rows} == {"a": "first", "k-b": None}
    assert reasons(rejects) == {"row-2": "missing_image_path", "k-pipe": "not_a_file", tmp_path.name: "not_a_file"}
    pq.write_table(pa.table({"image_path": ["a.jpg", "nul\0.jpg"], "caption": [3.5, None]}), tmp_path / "odd.parquet")
    assert reasons(ingest_in_process(tmp_path / "odd.parquet")[1]) == {"a": "bad_caption", "nul\0": "unreadable_file"}
    os.mkfifo(tmp_path / "fifo.csv")
    with deadline(10), pytest.raises(FgdataError, match="is not a table file"):
        IngestStage(tmp_path / "fifo.csv", "table").plan(make_config())
    with deadline(10), pytest.raises(FgdataError, match="is not a folder or a table file"):
        IngestStage(tmp_path / "fifo.csv").plan(make_config())


def test_a_folder_that_cannot_be_listed_is_a_reject(tmp_path, monkeypatch):
    # chmod 000 does not stop root, so the refusal is simulated where os.walk lists a folder.
    (tmp_path / "ok.jpg").write_bytes(image_bytes())
    (tmp_path / "locked").mkdir()
    real_scandir = os.scandir

    def refuse(path):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    rows, rejects = ingest_in_process(tmp_path)
    assert [r["key"] for r in rows] == ["ok"] and reasons(rejects) == {"locked": "unreadable_folder"}
