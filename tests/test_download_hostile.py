"""`fgdata download` against hostile URL lists and servers: addresses that are not public (also
reached by a redirect or a second DNS answer), redirects to other schemes, bodies that are not
images, endless and trickling bodies, and URLs that are not ASCII. Every server runs on 127.0.0.x."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, make_config, read_rows
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.shards import read_rejects
from pipeline.runner import run_stage
from pipeline.stages.fggrn import fetch
from pipeline.stages.fggrn.download import DownloadStage, reopen_failed_shards

GOOD = image_bytes((64, 48))
PAGE = b"<html><body>secret intranet page</body></html>"
MiB = 2**20


class _Handler(BaseHTTPRequestHandler):
    requests: Counter  # path -> times asked, set per server
    hosts: list  # the Host header of each request
    sent: Counter  # path -> body bytes written
    redirects: dict  # path -> Location

    def log_message(self, *args):
        pass

    def _headers(self, status: int, length: int | None = None, content_type: str = "image/jpeg", **extra: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()

    def _write(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client gave up (a broken pipe, a reset, a TLS EOF), as it should
            return False
        self.sent[self.path] += len(data)
        return True

    def do_GET(self):
        self.requests[self.path] += 1
        self.hosts.append(self.headers.get("Host"))
        path = self.path
        if path in self.redirects:
            self._headers(302, 0, Location=self.redirects[path])
        elif path.startswith("/good") or path.startswith("/caf%C3%A9"):
            self._headers(200, len(GOOD))
            self._write(GOOD)
        elif path in ("/noai.jpg", "/noai-for-another-robot.jpg"):  # X-Robots-Tag opt-outs
            robots = "noimageai, nofollow" if path == "/noai.jpg" else "otherbot: noai"
            self._headers(200, len(GOOD), **{"X-Robots-Tag": robots})
            self._write(GOOD)
        elif path == "/page.html":
            self._headers(200, len(PAGE), "text/html")
            self._write(PAGE)
        elif path == "/declared-huge.jpg":  # says 100 MiB up front
            self._headers(200, 100 * MiB)
            self._write(GOOD[:1000])
        elif path == "/unbounded.jpg":  # no Content-Length: the body ends when the connection does
            self.close_connection = True
            self._headers(200)
            chunk = GOOD + bytes(MiB - len(GOOD))
            for _ in range(16):  # 16 MiB, bounded only so that a client without a cap still finishes
                if not self._write(chunk):
                    break
        elif path == "/trickle.jpg":  # headers at once, then one byte a second
            self._headers(200, len(GOOD))
            for byte in GOOD[:12]:
                if not self._write(bytes([byte])):
                    break
                time.sleep(1)
        elif path == "/trickle-head.jpg":  # the status line itself, one byte a second
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n":
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    break
                time.sleep(1)
            self.close_connection = True
        else:
            self._headers(404, 9, "text/plain")
            self._write(b"not found")


def _serve(host: str = "127.0.0.1", redirects: dict | None = None):
    handler = type("Handler", (_Handler,), {"requests": Counter(), "hosts": [], "sent": Counter(), "redirects": redirects or {}})
    httpd = ThreadingHTTPServer((host, 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, handler


@pytest.fixture
def servers():
    """Starts servers on demand: `start(host, redirects)` → (base URL, handler class)."""
    running = []

    def start(host: str = "127.0.0.1", redirects: dict | None = None):
        httpd, handler = _serve(host, redirects)
        running.append(httpd)
        return f"http://{host}:{httpd.server_address[1]}", handler

    yield start
    for httpd in running:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def listener():
    """A bare TCP port that counts the connections made to it (an FTP or any other server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    accepted = []

    def accept():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield sock.getsockname()[1], accepted
    sock.close()
    for conn in accepted:
        conn.close()


@pytest.fixture
def public_127_0_0_2(monkeypatch):
    """127.0.0.2 counts as a public address (the test's stand-in for a web server on the internet);
    127.0.0.1 and every other loopback address stay private."""
    checked = fetch.public_address
    monkeypatch.setattr(fetch, "public_address", lambda ip: str(ip) == "127.0.0.2" or checked(ip))


def _download(tmp_path: Path, urls: dict[str, str], *settings: str, out_name: str = "images"):
    """Runs `fgdata download` on {key: url}; returns (rows by key, {key: (reason, detail)}, OUT)."""
    path = tmp_path / f"{out_name}.parquet"
    pq.write_table(pa.table({"key": list(urls), "url": list(urls.values()), "caption": [f"caption {k}" for k in urls]}), path)
    out = tmp_path / out_name
    run_stage(DownloadStage(path, out), out, make_config("download.threads=8", *settings))
    rejects = {r["key"]: (r["reason"], r["detail"]) for r in read_rejects(out).to_pylist()}
    return {r["key"]: r for r in read_rows(out)}, rejects, out


def _staged_bytes(out: Path) -> list[bytes]:
    return [p.read_bytes() for p in (out / "_download").rglob("*.img")]


# --- 1. addresses that are not public -----------------------------------------------------------

HOSTILE_HOSTS = {  # key -> (host as written in the URL, the address the detail names)
    "loopback": ("127.0.0.1", "127.0.0.1"),
    "localhost": ("localhost", "127.0.0.1"),
    "decimal": ("2130706433", "127.0.0.1"),
    "hex": ("0x7f000001", "127.0.0.1"),
    "short": ("127.1", "127.0.0.1"),
    "octal": ("0177.0.0.1", "127.0.0.1"),
    "mapped": ("[::ffff:127.0.0.1]", "127.0.0.1"),
    "ipv6-loopback": ("[::1]", "::1"),
    "any": ("0.0.0.0", "0.0.0.0"),
    "metadata": ("169.254.169.254", "169.254.169.254"),
    "ten": ("10.1.2.3", "10.1.2.3"),
    "one-seven-two": ("172.16.0.1", "172.16.0.1"),
    "one-nine-two": ("192.168.1.1", "192.168.1.1"),
    "cgnat": ("100.64.0.1", "100.64.0.1"),
    "unique-local": ("[fc00::1]", "fc00::1"),
    "link-local-v6": ("[fe80::1]", "fe80::1"),
    "multicast": ("224.0.0.1", "224.0.0.1"),
    "multicast-v6": ("[ff02::1]", "ff02::1"),
    "reserved": ("240.0.0.1", "240.0.0.1"),
    "broadcast": ("255.255.255.255", "255.255.255.255"),
    "mapped-private": ("[::ffff:10.0.0.1]", "10.0.0.1"),
}


def test_addresses_that_are_not_public_are_refused_before_any_connection(tmp_path, servers):
    base, handler = servers()
    port = base.rsplit(":", 1)[1]
    urls = {key: f"http://{host}:{port}/good/{key}.jpg" for key, (host, _) in HOSTILE_HOSTS.items()}
    started = time.perf_counter()
    rows, rejects, _ = _download(tmp_path, urls, "download.timeout=2")
    assert rows == {} and sum(handler.requests.values()) == 0  # the server on 127.0.0.1 was never asked
    assert {key: reason for key, (reason, _) in rejects.items()} == dict.fromkeys(HOSTILE_HOSTS, "blocked_address")
    for key, (_, address) in HOSTILE_HOSTS.items():
        assert address in rejects[key][1] and "not a public address" in rejects[key][1], rejects[key]
    assert time.perf_counter() - started < 20  # refused without waiting on any of them


def test_a_redirect_to_a_private_address_is_refused(tmp_path, servers, public_127_0_0_2):
    private, inside = servers("127.0.0.1")
    port = private.rsplit(":", 1)[1]
    public, outside = servers("127.0.0.2", {
        "/to-loopback.jpg": f"{private}/good/secret.jpg",
        "/to-decimal.jpg": f"http://2130706433:{port}/good/secret.jpg",
        "/to-metadata.jpg": "http://169.254.169.254/latest/meta-data/",
        "/hop-1.jpg": "/hop-2.jpg",  # a relative redirect, then one to loopback
        "/hop-2.jpg": f"{private}/good/secret.jpg",
        "/to-public.jpg": "/good/fine.jpg",
    })
    urls = {key: f"{public}/{key}.jpg" for key in ("to-loopback", "to-decimal", "to-metadata", "hop-1", "to-public")}
    rows, rejects, _ = _download(tmp_path, urls, "download.timeout=2")
    assert set(rows) == {"to-public"} and rows["to-public"]["image"] == GOOD
    assert {key: reason for key, (reason, _) in rejects.items()} == dict.fromkeys(("to-loopback", "to-decimal", "to-metadata", "hop-1"), "blocked_address")
    assert "127.0.0.1" in rejects["hop-1"][1] and "169.254.169.254" in rejects["to-metadata"][1]
    assert sum(inside.requests.values()) == 0 and outside.requests["/hop-2.jpg"] == 1


def test_the_connection_goes_to_the_address_that_was_checked(tmp_path, servers, public_127_0_0_2, monkeypatch):
    """DNS rebinding: a name that answers a public address, then a private one, is requested once,
    at the public address, with its own name in the Host header."""
    public, outside = servers("127.0.0.2")
    private, inside = servers("127.0.0.1")
    answers = Counter()
    resolve = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.example":
            return resolve(host, port, *args, **kwargs)
        answers[host] += 1
        return resolve("127.0.0.2" if answers[host] == 1 else "127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = public.rsplit(":", 1)[1]
    rows, rejects, _ = _download(tmp_path, {"a": f"http://rebind.example:{port}/good/a.jpg"}, "download.timeout=2")
    assert set(rows) == {"a"} and rejects == {}
    assert outside.hosts == [f"rebind.example:{port}"] and sum(inside.requests.values()) == 0


def test_allow_private_addresses_reaches_the_local_server(tmp_path, servers):
    base, handler = servers()
    rows, rejects, _ = _download(tmp_path, {"a": f"{base}/good/a.jpg"}, "download.allow_private_addresses=true")
    assert set(rows) == {"a"} and rejects == {} and handler.requests["/good/a.jpg"] == 1


@pytest.mark.parametrize(
    ("address", "public"),
    [("8.8.8.8", True), ("2606:4700::1111", True), ("::ffff:8.8.8.8", True), ("127.0.0.1", False), ("::ffff:192.168.0.1", False),
     ("100.64.0.1", False), ("224.0.0.1", False), ("ff02::1", False), ("fe80::1%1", False), ("::", False), ("2001:db8::1", False),
     # IPv6 addresses that carry an IPv4 one: IPv4-compatible, NAT64, 6to4
     ("::127.0.0.1", False), ("64:ff9b::7f00:1", False), ("64:ff9b::808:808", True), ("64:ff9b:1::808:808", False),
     ("2002:7f00:1::1", False), ("2002:808:808::1", True)],
)
def test_public_address(address, public):
    import ipaddress

    assert fetch.public_address(ipaddress.ip_address(address)) is public


# --- 2. bodies that are not images --------------------------------------------------------------


def test_a_body_that_is_not_an_image_is_not_kept(tmp_path, servers):
    base, handler = servers()
    urls = {"page": f"{base}/page.html", "good": f"{base}/good/1.jpg"}
    rows, rejects, out = _download(tmp_path, urls, "download.allow_private_addresses=true", "download.timeout=2")
    assert set(rows) == {"good"} and rejects["page"][0] == "not_an_image"
    assert _staged_bytes(out) == [GOOD]  # the page is nowhere on disk
    assert not any(PAGE in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_an_x_robots_tag_opt_out_is_honoured(tmp_path, servers):
    base, _ = servers()
    urls = {"noai": f"{base}/noai.jpg", "other": f"{base}/noai-for-another-robot.jpg"}
    rows, rejects, _ = _download(tmp_path, urls, "download.allow_private_addresses=true", "download.timeout=2")
    assert set(rows) == {"other"} and rejects["noai"][0] == "disallowed_by_site"


# --- 3. redirects to other schemes --------------------------------------------------------------


def test_a_redirect_to_another_scheme_is_refused(tmp_path, servers, listener):
    ftp_port, connections = listener
    base, handler = servers(redirects={
        "/to-ftp.jpg": f"ftp://127.0.0.1:{ftp_port}/x.jpg",
        "/to-file.jpg": "file:///etc/passwd",
        "/to-data.jpg": "data:image/jpeg;base64,/9j/4AAQ",
        "/to-gopher.jpg": f"gopher://127.0.0.1:{ftp_port}/x",
    })
    urls = {key: f"{base}/{key}.jpg" for key in ("to-ftp", "to-file", "to-data", "to-gopher")}
    rows, rejects, _ = _download(tmp_path, urls, "download.allow_private_addresses=true", "download.timeout=2")
    assert rows == {} and {key: reason for key, (reason, _) in rejects.items()} == dict.fromkeys(urls, "bad_redirect")
    assert f"ftp://127.0.0.1:{ftp_port}/x.jpg" in rejects["to-ftp"][1]
    assert connections == []


def test_a_redirect_loop_ends(tmp_path, servers):
    base, handler = servers(redirects={"/loop.jpg": "/loop.jpg"})
    rows, rejects, _ = _download(tmp_path, {"loop": f"{base}/loop.jpg"}, "download.allow_private_addresses=true")
    assert rejects["loop"][0] == "bad_redirect" and handler.requests["/loop.jpg"] == fetch.MAX_REDIRECTS + 1


# --- 4. size cap --------------------------------------------------------------------------------


def test_bodies_over_max_bytes_are_refused_while_streaming(tmp_path, servers):
    base, handler = servers()
    urls = {"declared": f"{base}/declared-huge.jpg", "unbounded": f"{base}/unbounded.jpg", "good": f"{base}/good/1.jpg"}
    rows, rejects, out = _download(tmp_path, urls, "download.allow_private_addresses=true", "download.max_bytes=1048576", "download.timeout=10")
    assert set(rows) == {"good"}
    assert {key: reason for key, (reason, _) in rejects.items()} == {"declared": "too_large", "unbounded": "too_large"}
    assert "104857600 bytes" in rejects["declared"][1] and "1048576" in rejects["unbounded"][1]
    assert _staged_bytes(out) == [GOOD]
    assert handler.sent["/unbounded.jpg"] < 8 * MiB  # the client stopped reading soon after the cap


# --- 5. a total deadline ------------------------------------------------------------------------


def _fetch_seconds(url: str, *settings: str) -> tuple[float, str | None]:
    """(seconds, reason or None) of one fetch, without the stage around it."""
    started = time.perf_counter()
    try:
        fetch.fetch(url, make_config(*settings).download)
        reason = None
    except fetch.Refused as refused:
        reason = refused.reason
    return time.perf_counter() - started, reason


def test_a_trickling_server_is_cut_off_at_the_deadline(tmp_path, servers):
    base, _ = servers()
    urls = {"body": f"{base}/trickle.jpg", "head": f"{base}/trickle-head.jpg"}
    settings = ("download.allow_private_addresses=true", "download.timeout=2")
    for url in urls.values():  # 12 s of body, 45 s of status line, if nothing cut them off
        seconds, reason = _fetch_seconds(url, *settings)
        assert reason == "timeout" and seconds < 2 + 1, f"{url}: {reason} after {seconds:.1f}s"
    started = time.perf_counter()
    rows, rejects, _ = _download(tmp_path, urls, *settings)
    assert rows == {} and {key: reason for key, (reason, _) in rejects.items()} == {"body": "timeout", "head": "timeout"}
    # the stage ends too (its start, importing img2dataset's writer, takes seconds on a busy machine)
    assert time.perf_counter() - started < 30


# --- 6. URLs that are not ASCII -----------------------------------------------------------------


def test_non_ascii_urls_are_encoded_and_a_bad_one_is_a_permanent_reject(tmp_path, servers, monkeypatch):
    base, handler = servers()
    port = base.rsplit(":", 1)[1]
    resolve = socket.getaddrinfo
    asked = []

    def idn_resolver(host, port, *args, **kwargs):  # the IDN name exists only in its ASCII form
        asked.append(host)
        return resolve("127.0.0.1" if host == "xn--bcher-kva.example" else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", idn_resolver)
    urls = {
        "path": f"{base}/café ü.jpg?q=naïve&x=ü",
        "idn": f"http://Bücher.example:{port}/good/idn.jpg",
        "too-long-label": f"http://{'☃' * 70}.example/x.jpg",
        "space-in-host": "http://exa mple.com/x.jpg",
        "bad-port": "http://example.com:99999/x.jpg",
    }
    settings = ("download.allow_private_addresses=true", "download.timeout=2")
    rows, rejects, out = _download(tmp_path, urls, *settings)
    assert set(rows) == {"path", "idn"} and rows["path"]["source"] == urls["path"]
    assert handler.requests["/caf%C3%A9%20%C3%BC.jpg?q=na%C3%AFve&x=%C3%BC"] == 1
    assert f"xn--bcher-kva.example:{port}" in handler.hosts and "xn--bcher-kva.example" in asked
    assert {key: reason for key, (reason, _) in rejects.items()} == dict.fromkeys(("too-long-label", "space-in-host", "bad-port"), "bad_url")
    # permanent: nothing to retry, so a rerun reopens no shard and asks for nothing
    before = sum(handler.requests.values())
    assert reopen_failed_shards(out) == []
    run_stage(DownloadStage(tmp_path / "images.parquet", out), out, make_config(*settings))
    assert sum(handler.requests.values()) == before


def test_a_rerun_asks_again_only_for_failures_that_may_pass(tmp_path, servers):
    """A 404 and a body over max_bytes are asked again (the server or the setting may change); a
    page that is not an image and a refused redirect are not."""
    base, handler = servers(redirects={"/to-ftp.jpg": "ftp://127.0.0.1:21/x"})
    urls = {"missing": f"{base}/missing.jpg", "big": f"{base}/declared-huge.jpg", "page": f"{base}/page.html", "to-ftp": f"{base}/to-ftp.jpg"}
    settings = ("download.allow_private_addresses=true", "download.timeout=2", "download.max_bytes=1048576")
    _download(tmp_path, urls, *settings)
    before = Counter(handler.requests)
    assert reopen_failed_shards(tmp_path / "images")
    _download(tmp_path, urls, *settings)
    assert {path for path in handler.requests if handler.requests[path] > before[path]} == {"/missing.jpg", "/declared-huge.jpg"}


@pytest.mark.parametrize(
    ("url", "encoded"),
    [
        ("http://Bücher.example/a b", "http://xn--bcher-kva.example/a%20b"),  # IDNA host, a space in the path
        ("http://faß.de/", "http://xn--fa-hia.de/"),  # IDNA 2008 keeps ß, as browsers do (IDNA 2003 made it fass.de)
        ("http://i❤.ws/", "http://xn--i-7iq.ws/"),  # a symbol IDNA 2008 refuses: IDNA 2003, as browsers open it
        ("http://例え.テスト/パス", "http://xn--r8jz45g.xn--zckzah/%E3%83%91%E3%82%B9"),
        ("http://[::1]:8080/p?q=é", "http://[::1]:8080/p?q=%C3%A9"),
        ("HTTP://user:pw@EXAMPLE.com#frag", "http://example.com/"),  # credentials and fragment are never sent
        ("http://ex.com/%7Efoo/%zz?a=%41", "http://ex.com/%7Efoo/%zz?a=%41"),  # escapes already there are kept
        ('http://a.com/"<>`{}|\\^', "http://a.com/%22%3C%3E%60%7B%7D%7C%5C%5E"),
    ],
)
def test_request_url_encodes_as_a_browser(url, encoded):
    assert fetch.request_url(url) == encoded


@pytest.mark.parametrize("url", ["ftp://x/", "http:///x", "http://a:99999/", "http://a b/", "http://[zz]/", f"http://{'☃' * 70}.com/", "http://a\udcff.com/", "http://x.com/\udcff"])
def test_request_url_refuses_what_cannot_be_encoded(url):
    with pytest.raises(ValueError):
        fetch.request_url(url)


@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=20))
def test_request_url_is_ascii_and_stable_or_refused(host, path, query):
    url = f"http://{host}/{path}?{query}"
    try:
        encoded = fetch.request_url(url)
    except ValueError:
        return
    assert encoded.isascii() and not any(ch <= " " or ch == "\x7f" for ch in encoded), encoded
    assert fetch.request_url(encoded) == encoded


# --- https: SNI and certificate checks for the name, the connection to the checked address ------


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    """An https server on 127.0.0.1 with a certificate for img.example that the fetcher trusts;
    img.example resolves to 127.0.0.1. Yields (base URL, handler class, names the client sent in SNI)."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "img.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("img.example")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    sni = []
    server_side.sni_callback = lambda _sock, server_name, _context: sni.append(server_name)
    httpd, handler = _serve()
    httpd.socket = server_side.wrap_socket(httpd.socket, server_side=True)
    monkeypatch.setattr(fetch, "_TLS", ssl.create_default_context(cafile=str(tmp_path / "cert.pem")))
    resolve = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: resolve("127.0.0.1" if host == "img.example" else host, *a, **k))
    yield f"https://img.example:{httpd.server_address[1]}", handler, sni
    httpd.shutdown()
    httpd.server_close()


def test_https_checks_the_name_on_the_checked_address_and_keeps_the_deadline(tmp_path, tls_server):
    base, handler, sni = tls_server
    port = base.rsplit(":", 1)[1]
    urls = {"good": f"{base}/good/1.jpg", "trickle": f"{base}/trickle.jpg", "wrong-name": f"https://127.0.0.1:{port}/good/2.jpg"}
    settings = ("download.allow_private_addresses=true", "download.timeout=2")
    seconds, reason = _fetch_seconds(urls["trickle"], *settings)
    assert reason == "timeout" and seconds < 2 + 1, f"{reason} after {seconds:.1f}s"  # the watchdog ends a TLS read too
    rows, rejects, _ = _download(tmp_path, urls, *settings)
    assert set(rows) == {"good"} and rows["good"]["image"] == GOOD and f"img.example:{port}" in handler.hosts
    assert "img.example" in sni
    assert rejects["trickle"][0] == "timeout"
    assert rejects["wrong-name"][0] == "connection_error" and "certificate" in rejects["wrong-name"][1].lower()
    assert handler.requests["/good/2.jpg"] == 0  # the certificate names img.example, not 127.0.0.1
