"""One image URL → its bytes, or why not: the fetcher behind `fgdata download`.

A URL list is untrusted input, and so is every server it names. The fetcher therefore:
- requests only http(s), the URL encoded as a browser sends it (`request_url`);
- resolves the host itself and refuses it unless every address is public (`public_address`), then
  connects to the address it checked, so a second DNS answer cannot switch it (DNS rebinding);
- follows redirects itself, at most MAX_REDIRECTS, each checked as the first URL was;
- gives one URL `timeout` seconds in all: a watchdog shuts the socket at the deadline, which ends
  a read that a server trickling one byte a second would otherwise keep alive;
- reads at most `max_bytes` of body (Content-Length is checked first, then the bytes counted).
Failures are `(reason, detail)`; reasons in RETRIED may pass on a later run, the others never will.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import idna

from pipeline.config import DownloadConfig

MAX_REDIRECTS = 10  # urllib's own limit
REDIRECTS = (301, 302, 303, 307, 308)
# the reasons a rerun requests again: the network's and the server's passing states, and the two a
# higher download.timeout or download.max_bytes may fix; a refused address or redirect, or a body
# that is not an image, is final
RETRIED = ("timeout", "connection_error", "incomplete_download", "disallowed_by_site", "download_error", "too_large")
# img2dataset's browser User-Agent (many image hosts refuse a library's) and its X-Robots-Tag opt-outs
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
DISALLOWED_DIRECTIVES = {"noai", "noimageai", "noindex", "noimageindex"}
_HOST = re.compile(r"[a-z0-9._-]+")
# what a browser leaves as it is in a path or query: the delimiters, and `%` so that escapes
# already there are kept (which also makes encoding twice the same as once)
_KEPT = "!$&'()*+,/:;=?@~%"
_TLS = ssl.create_default_context()
# IPv6 prefixes whose last 32 bits are an IPv4 address (IPv4-compatible, NAT64's well-known prefix),
# which Python 3.11 calls global; and NAT64's local-use prefix, whose IPv4 side is the operator's
_CARRY_IPV4 = (ipaddress.IPv6Network("::/96"), ipaddress.IPv6Network("64:ff9b::/96"))
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
_CHUNK = 64 * 1024


class Refused(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def retried(reason: str) -> bool:
    """Whether a rerun requests again a URL that failed for `reason`."""
    return reason in RETRIED or reason.startswith("http_")


def request_url(url: str) -> str:
    """The URL as a browser requests it: the host in IDNA (bücher.de → xn--bcher-kva.de), the path
    and query percent-encoded as UTF-8, credentials and fragment dropped. ValueError (UnicodeError
    included) for a URL that has no such form: not http(s), no host, a bad port, a host with
    characters no name can hold."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{parts.scheme or 'no'} scheme, not http(s)")
    host, port = parts.hostname, parts.port  # .port raises ValueError for a port out of range
    if not host:
        raise ValueError("no host")
    if ":" in host:  # a bracketed IPv6 address
        host = f"[{ipaddress.IPv6Address(host)}]"
    else:
        if not host.isascii():
            try:
                host = idna.encode(host, uts46=True).decode("ascii")
            except idna.IDNAError:  # IDNA 2008 refuses symbols (emoji names) that browsers still open as IDNA 2003
                host = host.encode("idna").decode("ascii")
        if not _HOST.fullmatch(host):
            raise ValueError(f"host {host!r} is not a host name")
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme.lower(), netloc, quote(parts.path or "/", safe=_KEPT), quote(parts.query, safe=_KEPT), ""))


def public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `ip` is on the public internet: not loopback, private, link-local, shared (CGNAT),
    reserved, multicast or unspecified. An IPv6 address that carries an IPv4 one (IPv4-mapped,
    IPv4-compatible, NAT64, 6to4) reaches that address, so it is judged by it."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return False
        carried = next((ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) for net in _CARRY_IPV4 if ip in net), None)
        ip = ip.ipv4_mapped or ip.sixtofour or carried or ip
    return ip.is_global and not ip.is_multicast


def fetch(url: str, config: DownloadConfig) -> bytes:
    """The body of `url` after its redirects, or Refused(reason, detail)."""
    deadline = time.monotonic() + config.timeout
    try:
        url = request_url(url)
    except ValueError as exc:
        raise Refused("bad_url", f"{url[:300]!r}: {exc}") from None
    for _ in range(MAX_REDIRECTS + 1):
        try:
            status, headers, body = _get(url, config, deadline)
        except Refused as refused:
            refused.detail = f"{url[:300]}: {refused.detail}"
            raise
        if status in REDIRECTS and headers.get("Location"):
            url = _redirect_target(url, headers["Location"])
            continue
        if status != 200:
            raise Refused(f"http_{status}", f"{url[:300]}: HTTP {status}")
        if _disallowed(headers):
            raise Refused("disallowed_by_site", f"{url[:300]}: X-Robots-Tag {headers.get('X-Robots-Tag')!r}")
        return body
    raise Refused("bad_redirect", f"{url[:300]}: more than {MAX_REDIRECTS} redirects")


def _redirect_target(url: str, location: str) -> str:
    """The encoded URL a redirect from `url` leads to, or Refused('bad_redirect'): not http(s) (ftp:,
    file:, data: ...), or no URL at all."""
    try:
        # http.client reads header bytes as Latin-1; a server's raw UTF-8 Location means UTF-8
        try:
            location = location.encode("latin-1").decode("utf-8")
        except UnicodeError:
            pass
        return request_url(urljoin(url, location))
    except ValueError as exc:
        raise Refused("bad_redirect", f"{url[:300]} redirects to {location[:300]!r}: {exc}") from None


def _get(url: str, config: DownloadConfig, deadline: float) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One GET of an encoded URL: (status, headers, body); the body only for a 200."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    # the socket keeps its connect timeout for every later wait, and the watchdog ends the total
    sock = _connect(parts.hostname, port, config, deadline)
    current = [sock]  # what the watchdog shuts: the TLS socket once it wraps the plain one
    watchdog = threading.Timer(max(deadline - time.monotonic(), 0), lambda: _shut(current[0]))
    watchdog.start()
    try:
        if https:
            sock = current[0] = _TLS.wrap_socket(sock, server_hostname=parts.hostname)
            connection = http.client.HTTPSConnection(parts.hostname, port, context=_TLS)
        else:
            connection = http.client.HTTPConnection(parts.hostname, port)
        connection.sock = sock  # already connected to the checked address: http.client does not resolve again
        connection.request("GET", urlunsplit(("", "", parts.path, parts.query, "")), headers={"User-Agent": USER_AGENT})
        response = connection.getresponse()
        body = _body(response, config.max_bytes) if response.status == 200 else b""
        return response.status, response.headers, body
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a server sends, it is this URL's reject
        if time.monotonic() >= deadline:
            raise Refused("timeout", f"no complete answer within download.timeout={config.timeout:g}s") from None
        if isinstance(exc, (TimeoutError, socket.timeout)):
            raise Refused("timeout", f"no answer within download.timeout={config.timeout:g}s") from None
        if isinstance(exc, http.client.IncompleteRead):
            raise Refused("incomplete_download", f"the connection closed after {len(exc.partial)} bytes of the body") from None
        if isinstance(exc, (OSError, http.client.HTTPException)):  # refused, reset, TLS, a malformed answer
            raise Refused("connection_error", f"{type(exc).__name__}: {exc}"[:300]) from None
        raise Refused("download_error", f"{type(exc).__name__}: {exc}"[:300]) from None
    finally:
        watchdog.cancel()
        sock.close()


def _connect(host: str, port: int, config: DownloadConfig, deadline: float) -> socket.socket:
    """A socket connected to one of `host`'s addresses, every one checked before any is tried."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise Refused("connection_error", f"cannot resolve {host}: {exc}") from None
    if not config.allow_private_addresses:
        private = sorted({sockaddr[0] for *_, sockaddr in addresses if not public_address(ipaddress.ip_address(sockaddr[0]))})
        if private:
            raise Refused("blocked_address", f"{host} is {', '.join(private)}: not a public address (download.allow_private_addresses)")
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    if time.monotonic() >= deadline or isinstance(error, TimeoutError):
        raise Refused("timeout", f"cannot connect to {host} within download.timeout={config.timeout:g}s")
    raise Refused("connection_error", f"cannot connect to {host}: {error}")


def _body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise Refused("too_large", f"the server announces {declared} bytes, over download.max_bytes={max_bytes}")
    chunks, size = [], 0
    while chunk := response.read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise Refused("too_large", f"the body goes on past download.max_bytes={max_bytes}")
        chunks.append(chunk)
    if declared and declared.isdigit() and size < int(declared):  # http.client's read(n) ends quietly at a closed connection
        raise http.client.IncompleteRead(b"".join(chunks), int(declared) - size)
    return b"".join(chunks)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def _disallowed(headers: http.client.HTTPMessage) -> bool:
    """An X-Robots-Tag opt-out for every robot (`noai`) or addressed to none in particular, as
    img2dataset reads it with no user-agent token of its own."""
    for value in headers.get_all("X-Robots-Tag", []):
        robot, _, directives = value.partition(":") if ":" in value else ("", "", value)
        if not robot.strip() and DISALLOWED_DIRECTIVES & {d.strip().lower() for d in directives.split(",")}:
            return True
    return False
