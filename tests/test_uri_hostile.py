"""Hostile URIs on every surface that takes a dataset or an output file: a URI reaches the stages
intact (never pathlib's `./s3:/...`), `file:///abs` is that absolute path, a scheme fgdata does not
read or write is refused, a malformed store URI is refused by one rule, a wrong AWS_ENDPOINT_URL is
one line that names it, and a bucket root is never an OUT that --overwrite could empty."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import time

import pytest
import yaml
from conftest import FGDATA, SAMPLE_IMAGES
from hypothesis import given, settings
from hypothesis import strategies as st
from object_store import all_objects, bucket, put_object, s3_server  # noqa: F401 (fixtures)
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core import storage
from pipeline.core.shards import MANIFEST_FILE, claim_output, read_json
from pipeline.datasets.synthetic_world import write_world
from pipeline.errors import FgdataError

SAMPLE_CSV = SAMPLE_IMAGES.parent / "hierarcaps" / "handwritten_train.csv"
UNSUPPORTED = ["memory://x/out", "http://example.com/out", "https://example.com/out", "ftp://example.com/out", "unknown://x/out"]
MALFORMED = ["s3://", "s3:///x", "s3://bkt//x", "s3://bkt/a/../b", "s3://bkt/./a", "s3://..", "s3://bkt/..", "gs:///x"]


def run_cli(*args: str, cwd, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """conftest.run_cli in the folder `cwd`, where a mangled URI would land."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([str(FGDATA), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def error_lines(result) -> list[str]:
    """What the command says beyond fgdata's own log lines (botocore logs through them too)."""
    return [line for line in result.stderr.splitlines() if not line.startswith("fgdata: ")]


def assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- the parsing rule -----------------------------------------------------------------------


@pytest.mark.parametrize("uri", UNSUPPORTED)
def test_a_scheme_fgdata_does_not_support_is_refused(uri):
    with pytest.raises(FgdataError, match=r"s3://, gs://, hf://") as error:
        storage.location(uri)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("uri", MALFORMED)
def test_a_malformed_store_uri_is_refused(uri):
    with pytest.raises(FgdataError) as error:
        storage.location(uri)
    assert "\n" not in str(error.value) and uri in str(error.value)


def test_trailing_slashes_and_scheme_case_name_the_same_place():
    assert str(storage.location("s3://bkt/out/")) == str(storage.location("S3://bkt/out//")) == "s3://bkt/out"


def test_file_uri_is_an_absolute_local_path(tmp_path):
    assert storage.location(f"file://{tmp_path}/a%20b") == tmp_path / "a b"
    assert storage.location(f"file://localhost{tmp_path}") == tmp_path
    with pytest.raises(FgdataError, match="file:///"):
        storage.location("file://data/out")  # "data" would be a host name


def test_local_only_folders_read_a_file_uri_as_its_path(tmp_path):
    """Where a stage or the trainer makes a folder path itself, `file:///abs` is /abs too."""
    from pipeline.stages.fggrn.download import DownloadStage
    from pipeline.train.checkpoints import local_model_dir

    assert DownloadStage(str(SAMPLE_CSV), f"file://{tmp_path}/images").out_dir == tmp_path / "images"
    assert local_model_dir(f"file://{tmp_path}/model") == tmp_path / "model"


@settings(max_examples=150, deadline=None)
@given(
    scheme=st.sampled_from(["s3", "gs", "hf", "S3", "memory", "http", "file", "x"]),
    rest=st.text(alphabet="ab/.%?#@ \\:", max_size=12),
)
def test_any_uri_is_a_location_or_a_one_line_error(scheme, rest):
    """Never another exception, and a location always names the place the text names."""
    uri = f"{scheme}://{rest}"
    try:
        place = storage.location(uri)
    except FgdataError as error:
        assert "\n" not in str(error)
        return
    if storage.is_uri(place):
        parts = str(place).rstrip("/").split("://", 1)[1].split("/")
        assert str(place).rstrip("/") == f"{scheme.lower()}://{rest.rstrip('/')}"  # a bucket prints as s3://b/
        assert "" not in parts and "." not in parts and ".." not in parts
    else:
        assert place.is_absolute()


# --- every command -------------------------------------------------------------------------


def test_run_keeps_source_and_out_uris(bucket, tmp_path):
    """`fgdata run` with SOURCE and OUT on the store: every step writes there, nothing lands in the
    working folder as `s3:/...`."""
    for path in sorted(SAMPLE_IMAGES.iterdir()):
        if path.is_file():
            put_object(f"{bucket}/raw/{path.name}", path.read_bytes())
    recipe = tmp_path / "short.yaml"
    recipe.write_text(yaml.safe_dump({"steps": [{"name": "images", "stage": "ingest", "input": "SOURCE"}, {"name": "phrases", "stage": "phrases", "input": "images"}]}))
    work = tmp_path / "cwd"
    work.mkdir()
    result = run_cli("run", str(recipe), f"{bucket}/raw/", f"{bucket}/run", "--executor", "local", "-s", "run.progress=false", cwd=work)
    assert result.returncode == 0, result.stderr
    assert list(work.iterdir()) == []
    phrases = read_json(f"{bucket}/run/phrases/{MANIFEST_FILE}")
    assert phrases["inputs"][0]["path"] == f"{bucket}/run/images"
    assert read_json(f"{bucket}/run/images/{MANIFEST_FILE}")["inputs"][0]["path"] == f"{bucket}/raw"
    assert f"wrote {bucket}/run/phrases:" in result.stdout
    result = run_cli("run", str(recipe), f"{bucket}/raw", "memory://x/run", cwd=work)
    assert_one_line_error(result, "memory://x/run", "s3://, gs://, hf://")
    assert "overlap" not in result.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root, 12, seed=1, rows_per_shard=6)
    return root


def test_report_audit_and_export_write_a_uri_out_to_the_store(world, bucket, tmp_path):
    commands = [
        (["report", str(world / "fggrn")], f"{bucket}/pages/report.html"),
        (["audit", "sample", str(world / "fggrn"), "--n", "4"], f"{bucket}/pages/audit.html"),
        (["hierarcaps", "export", str(world / "hierarcaps")], f"{bucket}/csv/train.csv"),
    ]
    for args, out in commands:
        given = [*args, out] if args[0] == "hierarcaps" else [*args, "--out", out]
        result = run_cli(*given, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"wrote {out}"), result.stdout
    objects = all_objects(bucket)
    assert objects[f"{bucket[5:]}/pages/report.html"].lower().startswith(b"<!doctype html>")
    assert b"<html" in objects[f"{bucket[5:]}/pages/audit.html"]
    assert objects[f"{bucket[5:]}/csv/train.csv"].startswith(b"positive,negative")
    assert f"{bucket[5:]}/csv/train.csv.DATACARD.md" in objects
    assert list(tmp_path.iterdir()) == []  # no ./s3:/ folder


def test_file_uri_out_is_the_absolute_path(world, tmp_path):
    work, target = tmp_path / "cwd", tmp_path / "target"
    work.mkdir()
    result = run_cli("hierarcaps", "import", str(SAMPLE_CSV), f"file://{target}/chains", cwd=work)
    assert result.returncode == 0, result.stderr
    assert (target / "chains" / MANIFEST_FILE).is_file()
    result = run_cli("report", str(world / "fggrn"), "--out", f"file://{target}/report.html", cwd=work)
    assert result.returncode == 0, result.stderr
    assert (target / "report.html").is_file() and f"wrote {target}/report.html" in result.stdout
    assert list(work.iterdir()) == []
    assert_one_line_error(run_cli("hierarcaps", "import", str(SAMPLE_CSV), "file://relative/out", cwd=work), "file:///")


def test_an_unsupported_out_or_input_scheme_exits_2(tmp_path):
    assert_one_line_error(run_cli("hierarcaps", "import", str(SAMPLE_CSV), "memory://x/out", cwd=tmp_path), "memory://x/out", "s3://, gs://, hf://")
    assert_one_line_error(run_cli("report", str(SAMPLE_CSV.parent), "--out", "ftp://x/r.html", cwd=tmp_path), "s3://, gs://, hf://")
    # an input, refused while the stage is built (before the command's own error handling)
    assert_one_line_error(run_cli("hierarcaps", "import", "http://example.com/train.csv", str(tmp_path / "o"), cwd=tmp_path), "s3://, gs://, hf://")
    assert list(tmp_path.iterdir()) == []


def test_a_local_only_out_refuses_a_uri(world, tmp_path):
    """synthetic-world, tiny-model, export fgclip and --config write or read on disk only: a URI
    there is refused, never the local folder `./s3:/b/x` that typer's Path makes of it."""
    assert_one_line_error(run_cli("synthetic-world", "s3://b/world", "--count", "2", cwd=tmp_path), "s3://b/world", "not a store URI")
    assert_one_line_error(run_cli("export", "fgclip", str(world / "fggrn"), "s3://b/fgclip", cwd=tmp_path), "s3://b/fgclip", "not a store URI")
    assert list(tmp_path.iterdir()) == []


# --- bucket roots and malformed URIs on the command line -------------------------------------


def test_a_bucket_root_is_never_an_out(bucket, tmp_path):
    put_object(f"{bucket}/theirs/data.bin", b"keep me")
    assert_one_line_error(run_cli("hierarcaps", "import", str(SAMPLE_CSV), f"{bucket}/", "--overwrite", cwd=tmp_path), f"{bucket} is a whole bucket")
    with pytest.raises(FgdataError, match="bucket"):
        claim_output(bucket, "phrases", "h", overwrite=True)
    assert all_objects(bucket) == {f"{bucket[5:]}/theirs/data.bin": b"keep me"}


def test_a_malformed_out_exits_2_and_writes_nothing(bucket, tmp_path):
    for out in ["s3:///x", f"{bucket}//x", f"{bucket}/a/../b"]:  # the rest of the rule: the parsing tests above
        assert_one_line_error(run_cli("hierarcaps", "import", str(SAMPLE_CSV), out, cwd=tmp_path), out)
    assert all_objects(bucket) == {}


# --- a wrong endpoint -----------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _NotS3(http.server.BaseHTTPRequestHandler):
    """A web server that is not a store: every request gets a 200 HTML page."""

    def _answer(self):
        body = b"<html><body>a web page</body></html>"
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def not_s3():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(
    "where, args",
    [
        ("refused", ["hierarcaps", "import", str(SAMPLE_CSV), "s3://bkt/out"]),  # was a botocore traceback after ~10 s
        ("not_s3", ["hierarcaps", "import", str(SAMPLE_CSV), "s3://bkt/out"]),  # was "s3://bkt/out is a file"
        ("not_s3", ["info", "s3://bkt/out"]),  # was "is not a directory of Parquet shards"
    ],
)
def test_a_wrong_endpoint_is_one_line_naming_it(where, args, request, tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}" if where == "refused" else request.getfixturevalue("not_s3")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    started = time.monotonic()
    result = run_cli(*args, env_extra=env, timeout=60, cwd=tmp_path)
    assert time.monotonic() - started < 20, f"{args} took {time.monotonic() - started:.0f}s"
    assert_one_line_error(result, endpoint)


@pytest.mark.parametrize(
    "where, args, says",
    [
        # was a minute of gcsfs's retries, then a traceback of 150 lines per request
        ("refused", ["ingest", str(SAMPLE_IMAGES), "gs://bkt/images", "--executor", "local"], "Connection refused"),
        ("not_gcs", ["info", "gs://bkt/out"], "does not answer as GCS does"),
    ],
)
def test_a_wrong_gcs_endpoint_is_one_line_naming_it_before_any_retry(where, args, says, request, tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}" if where == "refused" else request.getfixturevalue("not_s3")
    env = {"STORAGE_EMULATOR_HOST": endpoint, "FSSPEC_GS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    started = time.monotonic()
    result = run_cli(*args, env_extra=env, timeout=120, cwd=tmp_path)
    assert time.monotonic() - started < 20, f"{args} took {time.monotonic() - started:.0f}s"
    assert_one_line_error(result, endpoint, "STORAGE_EMULATOR_HOST", "gs://bkt", says)
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


def test_a_librarys_log_lines_keep_to_warnings_without_their_traceback(capsys):
    """A store client logs each exhausted retry with its traceback (gcsfs: 150 lines), and its
    notices at INFO; on the terminal that buries the command's one-line error. fgdata's own INFO
    lines stay."""
    import logging

    from pipeline import cli

    handlers, level, own_levels = logging.root.handlers[:], logging.root.level, {name: logging.getLogger(name).level for name in cli._OWN_LOGGERS}
    cli._log_to_stderr()
    try:
        try:
            raise ConnectionRefusedError("Connect call failed")
        except ConnectionRefusedError:
            logging.getLogger("gcsfs").exception("_request out of retries on exception")
            logging.getLogger("pipeline.core.storage").exception("a failure of fgdata's own")
        logging.getLogger("gcsfs").info("experimental features enabled")
        logging.getLogger("pipeline.runner").info("ingest: 1 shard(s)")
        logging.getLogger("fgdata").info("a command's line")
    finally:  # this process's logging as it was: pytest's own capture handlers
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
        for name, own_level in own_levels.items():
            logging.getLogger(name).setLevel(own_level)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "fgdata: _request out of retries on exception"
    assert lines[1] == "fgdata: a failure of fgdata's own" and lines[2] == "Traceback (most recent call last):"
    assert lines[-2:] == ["fgdata: ingest: 1 shard(s)", "fgdata: a command's line"]
    assert "experimental features enabled" not in "\n".join(lines) and sum(line.startswith("Traceback") for line in lines) == 1


def test_a_later_command_in_the_same_process_keeps_its_own_message(request, monkeypatch):
    """The buckets one command named are not the next command's endpoint problem (the CLI runs many
    commands in one process under tests): its own message stands, and a bucket name S3 would refuse
    is never taken for the endpoint's fault."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("not_s3"))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    cli = CliRunner()
    first = cli.invoke(app, ["info", "s3://bkt/out"])
    assert first.exit_code == 2 and "cannot use the S3 endpoint" in first.stderr
    later = cli.invoke(app, ["plan", "fggrn"])
    assert later.exit_code == 2 and "needs --images N or --captions N" in later.stderr
    assert "S3 endpoint" not in later.stderr
    odd_bucket = cli.invoke(app, ["info", "s3://BKT_/out"])
    assert "cannot use the S3 endpoint" not in odd_bucket.stderr
