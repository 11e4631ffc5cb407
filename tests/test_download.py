"""`fgdata download` against a real HTTP server on 127.0.0.1: good images, 404s, slow answers,
bodies cut short, truncated and non-image bodies, tiny images, and a URL that fails once."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_dataset_invariants, image_bytes, make_config, read_rows

from pipeline.core.shards import read_json, read_rejects
from pipeline.errors import FgdataError
from pipeline.runner import run_stage
from pipeline.stages.fggrn.download import DownloadStage, plan_url_records, reopen_failed_shards

GOOD = image_bytes((64, 48))


class _Handler(BaseHTTPRequestHandler):
    requests: Counter  # path -> times asked, set per server

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg", length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
            pass

    def do_GET(self):
        self.requests[self.path] += 1
        if self.path.startswith("/good/"):
            self._send(200, GOOD)
        elif self.path == "/slow.jpg":
            time.sleep(3)
            self._send(200, GOOD)
        elif self.path == "/cut-short.jpg":  # promises more bytes than it sends, then hangs up
            self._send(200, GOOD[:100], length=len(GOOD))
            self.close_connection = True
        elif self.path == "/truncated.jpg":  # a JPEG cut in half, served as a whole file
            self._send(200, GOOD[: len(GOOD) // 2])
        elif self.path == "/page.html":
            self._send(200, b"<html><body>not an image</body></html>", "text/html")
        elif self.path == "/tiny.png":
            self._send(200, image_bytes((4, 4), "PNG"), "image/png")
        elif self.path == "/flaky.jpg":  # fails the first time only
            self._send(503, b"busy", "text/plain") if self.requests[self.path] == 1 else self._send(200, GOOD)
        else:
            self._send(404, b"not found", "text/plain")


@pytest.fixture
def server():
    handler = type("Handler", (_Handler,), {"requests": Counter()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.requests
    httpd.shutdown()
    httpd.server_close()


def _url_list(tmp_path: Path, base: str) -> tuple[Path, dict[str, str]]:
    expected = {  # key -> the reason it ends with ("" = an image row)
        "good-0": "", "good-1": "", "good-2": "", "flaky": "http_503", "missing": "http_404", "slow": "timeout",
        "cut-short": "incomplete_download", "truncated": "decode_error", "page": "not_an_image", "tiny": "image_too_small",
        "local-file": "bad_url", "no-url": "missing_url",
    }
    paths = {"good-0": "/good/0.jpg", "good-1": "/good/1.jpg", "good-2": "/good/2.jpg", "flaky": "/flaky.jpg", "missing": "/missing.jpg",
             "slow": "/slow.jpg", "cut-short": "/cut-short.jpg", "truncated": "/truncated.jpg", "page": "/page.html", "tiny": "/tiny.png"}
    rows = [{"key": k, "url": base + p, "caption": f"caption of {k}"} for k, p in paths.items()]
    rows += [{"key": "local-file", "url": "file:///etc/passwd", "caption": "x"}, {"key": "no-url", "url": None, "caption": "x"}]
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, expected


def test_download_rejects_by_reason_and_a_rerun_retries_only_the_failures(tmp_path, server, ray_session):
    base, requests = server
    urls, expected = _url_list(tmp_path, base)
    out = tmp_path / "images"
    config = make_config("download.timeout=0.5", "download.threads=8", "ingest.rows_per_shard=5", "download.allow_private_addresses=true")
    started = time.perf_counter()
    summary = run_stage(DownloadStage(urls, out), out, config)
    seconds = time.perf_counter() - started

    assert_dataset_invariants(out, set(expected))
    rows = {r["key"]: r for r in read_rows(out)}
    reasons = {r["key"]: r["reason"] for r in read_rejects(out).to_pylist()}
    assert set(rows) == {k for k, why in expected.items() if not why}
    assert reasons == {k: why for k, why in expected.items() if why}
    assert rows["good-0"]["image"] == GOOD and rows["good-0"]["short_caption"] == "caption of good-0"
    assert rows["good-0"]["source"] == f"{base}/good/0.jpg"  # the URL, not the staging file
    assert requests["/etc/passwd"] == 0 and summary.rows_in == len(expected)
    print(f"\ndownload figures: {len(expected)} URLs, {len(rows)} images, rejects {dict(Counter(reasons.values()))}, {seconds:.1f}s")

    # rerun: only shards with network failures reopen, and only their failed URLs are requested again
    before = Counter(requests)
    reopened = reopen_failed_shards(out)
    assert reopened and all((out / "_stats" / n.replace(".parquet", ".json")).exists() for n in reopened)
    run_stage(DownloadStage(urls, out), out, config)
    asked_again = {path for path in requests if requests[path] > before[path]}
    assert asked_again == {"/flaky.jpg", "/missing.jpg", "/slow.jpg", "/cut-short.jpg"}
    assert_dataset_invariants(out, set(expected))
    rows = {r["key"]: r for r in read_rows(out)}
    reasons = {r["key"]: r["reason"] for r in read_rejects(out).to_pylist()}
    assert "flaky" in rows and "flaky" not in reasons  # it answers now
    assert reasons["truncated"] == "decode_error" and reasons["missing"] == "http_404"
    assert read_json(out / "_manifest.json")["rows_out"] == len(rows)


def test_fgclip_json_keys_are_f_path(tmp_path, server, ray_session):
    base, _ = server
    items = [
        {"f_path": "grit-20m/00000/000000001.jpg", "url": f"{base}/good/1.jpg", "short_caption": "a red cup", "caption": "A long caption."},
        {"f_path": "grit-20m/00000/000000002.jpg", "url": f"{base}/gone.jpg", "short_caption": "a dog", "caption": "Another."},
        "not an object",
    ]
    path = tmp_path / "finehard.json"
    path.write_text(json.dumps(items))
    out = tmp_path / "images"
    run_stage(DownloadStage(path, out), out, make_config("download.timeout=2", "download.allow_private_addresses=true"))
    rows = read_rows(out)
    assert [(r["key"], r["short_caption"]) for r in rows] == [("grit-20m/00000/000000001.jpg", "a red cup")]
    reasons = {r["key"]: r["reason"] for r in read_rejects(out).to_pylist()}
    assert reasons == {"grit-20m/00000/000000002.jpg": "http_404", "finehard-000000002": "bad_record"}


def test_url_list_planning(tmp_path):
    csv = tmp_path / "cc.csv"
    csv.write_text("url,caption\nhttp://a/x.jpg,one\nftp://a/y.jpg,two\nhttps://a/z.jpg,three\n")
    planned = plan_url_records(csv)
    assert [p["key"] for p in planned] == ["cc-000000000", "cc-000000001", "cc-000000002"]
    assert [p["problem"][0] if p["problem"] else None for p in planned] == [None, "bad_url", None]
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"id": [7, 7], "url": ["http://a/1", "http://a/2"]}), dup)
    assert [p["problem"] and p["problem"][0] for p in plan_url_records(dup)] == [None, "duplicate_key"]
    no_urls = tmp_path / "nourl.csv"
    no_urls.write_text("path,caption\nx.jpg,one\n")
    with pytest.raises(FgdataError, match="no URL column"):
        plan_url_records(no_urls)
    with pytest.raises(FgdataError, match="cannot read"):
        (tmp_path / "bad.json").write_text("{not json")
        plan_url_records(tmp_path / "bad.json")
