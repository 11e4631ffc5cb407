"""Where datasets live: a local path or an object-store URI (`s3://`, `gs://`, `hf://`).

A location is a `pathlib.Path` for a local path and a `upath.UPath` (pathlib's API over the fsspec
filesystem: s3fs, gcsfs, huggingface_hub's HfFileSystem) for a URI, so code that joins, lists,
reads and writes a dataset is the same for both. Endpoint and credentials come from the standard
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for S3 and S3-compatible stores such as
MinIO; GOOGLE_APPLICATION_CREDENTIALS; HF_TOKEN), read by the filesystems themselves.

Local behaviour is exactly what it was before URIs: every function here returns the `Path` the
old code built, and takes a local branch that does what the old code did.

One rule for the text of a location, wherever it comes from (an argument, a setting, a manifest's
lineage, a table cell): `file:///abs/path` is that local path; `s3://`, `gs://` and `hf://` are
stores, spelled one way (scheme in lower case, no trailing `/`) and refused when they name no
bucket or hold an empty, `.` or `..` part; any other scheme is refused, since fsspec would read
or write `memory://`, `http://`, ... somewhere the user does not expect.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Union

from pyarrow import PythonFile
from pyarrow.fs import FSSpecHandler, PyFileSystem
from upath import UPath

from pipeline.errors import FgdataError, first_line

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
TMP_TAG = ".tmp-"  # in the names of the temporary files of local writes

Location = Union[Path, UPath]


# The stores fgdata reads and writes (README, "Object storage"), and how a refusal names them.
STORES = ("s3", "gs", "hf")
SUPPORTED = "local paths (file:///abs/path too) and s3://, gs://, hf:// URIs"
_CHECKING_GCS = False  # inside a command, a gs:// bucket's endpoint is checked: see command_endpoints
_S3_BUCKETS: set[str] = set()  # the buckets the running command named: what s3_endpoint_problem asks about
# S3's rule for a bucket name: anything else is refused by the client itself, no endpoint's fault
_S3_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_uri(value) -> bool:
    """An object-store location (`s3://...`), as a string or a UPath; `file://` counts as local. Any
    other `scheme://` text counts too, so that `location` refuses it instead of it becoming a local
    folder named `scheme:`."""
    if isinstance(value, UPath) and not isinstance(value, Path):  # a local UPath is a Path
        return True
    return isinstance(value, str) and bool(_URI.match(value)) and not _is_file_uri(value)


def _is_file_uri(value: str) -> bool:
    return value[:7].lower() == "file://"


def location(value) -> Location:
    """`value` (a str, Path or UPath) as a location: `Path(value)` when local, a UPath for a URI.
    A URI that breaks the rule above is a one-line FgdataError."""
    if is_uri(value):
        if not isinstance(value, str):
            return value
        uri = store_uri(value)
        options = {}
        if uri.startswith("s3://") and _S3_BUCKET_NAME.fullmatch(bucket := uri[5:].partition("/")[0]):
            _S3_BUCKETS.add(bucket)
            options = _s3_options()
        try:
            # No listings cache: Ray workers write markers the driver lists, and a cached listing
            # would hide them (or show deleted ones) for the rest of the run.
            place = UPath(uri, use_listings_cache=False, **options)
        except (ImportError, ValueError) as exc:  # its filesystem not installed
            raise FgdataError(f"{value}: no filesystem for this URI ({first_line(exc)}); s3:// needs s3fs, gs:// gcsfs") from None
        if uri.startswith("gs://") and _CHECKING_GCS:
            _check_gcs_endpoint(place)
        return place
    if isinstance(value, str) and _is_file_uri(value):
        return _file_uri_path(value)
    return Path(value)


def store_uri(value: str) -> str:
    """The store URI `value` in fgdata's one spelling; FgdataError when it breaks the rule. A store
    keeps `.` and `..` in a key literally (`s3://b/a/../x` is not `s3://b/x`, though every tool that
    prints it suggests so), and `s3://b//x` names the key `/x`: both are refused, not guessed at."""
    scheme, _, rest = value.partition("://")
    scheme, rest = scheme.lower(), rest.rstrip("/")
    if scheme not in STORES:
        raise FgdataError(f"{value}: fgdata reads and writes {SUPPORTED}, not {scheme}://")
    parts = rest.split("/")
    if not parts[0]:
        raise FgdataError(f"{value} names no bucket; write {scheme}://BUCKET/path")
    if any(part in ("", ".", "..") for part in parts):
        raise FgdataError(f"{value} has an empty, '.' or '..' part, which a store keeps as part of the key; name the object by its plain path")
    return f"{scheme}://{rest}"


def _file_uri_path(value: str) -> Path:
    """The absolute path a `file://` URI names (RFC 8089): `file:///abs/path` or
    `file://localhost/abs/path`, percent-decoded. `file://data/x` names the host `data`, and is
    refused rather than read as the relative path `data/x`."""
    host, slash, path = value[len("file://") :].partition("/")
    if host.lower() not in ("", "localhost") or not slash:
        raise FgdataError(f"{value}: a file URI names an absolute path, file:///abs/path (here {host!r} would be a host)")
    return Path(urllib.parse.unquote("/" + path))


def _s3_options() -> dict:
    # A wrong endpoint must fail in seconds: botocore's default ("legacy") retry mode tries a refused
    # connection 5 times with backoff, its standard mode 3 times (AWS_MAX_ATTEMPTS and AWS_RETRY_MODE
    # still decide when set). A new dict each time: botocore writes into the one it is given.
    return {"config_kwargs": {"retries": {"mode": os.environ.get("AWS_RETRY_MODE", "standard")}}}


def _s3_endpoint() -> str:
    """The S3 endpoint as the user set it, for messages."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f"{endpoint} (AWS_ENDPOINT_URL)" if endpoint else "AWS S3"


@contextmanager
def command_endpoints():
    """One command's view of the stores' endpoints: the S3 buckets earlier commands of this process
    named (tests run many in one process) are not its concern, and each gs:// bucket it names has
    its endpoint checked on first use. Outside a command (a Ray worker, a library call) `location`
    only parses: the driver has checked already."""
    global _CHECKING_GCS
    _S3_BUCKETS.clear()
    _CHECKING_GCS = True
    try:
        yield
    finally:
        _CHECKING_GCS = False


def s3_endpoint_problem() -> str | None:
    """Why the S3 endpoint cannot serve the buckets this process named, or None. Asked after a
    command failed, so that a refused connection or a server that is not S3 (a web page for every
    request, an HTTP error without S3's error code) is reported as that, in one line naming the
    endpoint, and not as a traceback or a misleading "does not exist" / "is a file". One listing of
    at most one key per bucket; an answer in S3's own words (a missing bucket, a denied listing)
    is no endpoint problem: the command's own message stands."""
    if not _S3_BUCKETS:
        return None
    from s3fs import S3FileSystem

    fs = S3FileSystem(**_s3_options())
    for bucket in sorted(_S3_BUCKETS):
        try:
            if "Name" in fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1):
                continue
            problem = "it does not answer as S3 does (is it a web server?)"
        except Exception as exc:  # noqa: BLE001 - a client's errors are not all OSErrors
            code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code", "")
            if code and not code.isdigit():  # S3 names its errors (NoSuchBucket, AccessDenied)
                continue
            problem = first_line(exc.__cause__ or exc)
        return f"cannot use the S3 endpoint {_s3_endpoint()} for s3://{bucket}: {problem}"
    return None


_GCS_ENDPOINTS_CHECKED: dict[tuple[str, str], str | None] = {}  # (endpoint, bucket): the problem found


def _check_gcs_endpoint(place: UPath) -> None:
    """Stops a command at once, in one line, when the GCS endpoint cannot serve `place`'s bucket.
    gcsfs retries a refused connection or an unknown host 6 times with backoff: over a minute per
    request, a traceback logged for each, before the command could say anything. One GET of the
    bucket's metadata (10 s at most, through the environment's proxy as any HTTP client) once per
    bucket and process decides it. An answer in GCS's JSON (a missing bucket, no credentials) is
    no endpoint problem, and a timeout gives no verdict: gcsfs's own retries handle slow networks."""
    base = place.fs.base  # ENDPOINT/storage/v1/: STORAGE_EMULATOR_HOST, an endpoint_url, or GCS itself
    bucket = place.path.partition("/")[0]
    if (base, bucket) not in _GCS_ENDPOINTS_CHECKED:
        _GCS_ENDPOINTS_CHECKED[base, bucket] = _gcs_endpoint_problem(f"{base}b/{urllib.parse.quote(bucket, safe='')}")
    problem = _GCS_ENDPOINTS_CHECKED[base, bucket]
    if problem:
        endpoint = base.removesuffix("/storage/v1/")
        named = " (STORAGE_EMULATOR_HOST)" if os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default") else ""
        raise FgdataError(f"cannot use the GCS endpoint {endpoint}{named} for gs://{bucket}: {problem}")


def _gcs_endpoint_problem(bucket_url: str) -> str | None:
    not_gcs = "it does not answer as GCS does (is it a web server?)"
    try:
        with urllib.request.urlopen(bucket_url + "?fields=name", timeout=10) as response:
            body = response.read(1 << 16)
    except urllib.error.HTTPError as exc:  # an answer: if in GCS's words, the command's own message stands
        body = exc.read(1 << 16)
    except urllib.error.URLError as exc:  # no answer: refused, unknown host, TLS
        return None if isinstance(exc.reason, TimeoutError) else first_line(exc.reason)
    except TimeoutError:
        return None
    except http.client.HTTPException:  # not HTTP at all
        return not_gcs
    except OSError as exc:  # the connection dropped
        return first_line(exc)
    try:
        json.loads(body)
    except ValueError:
        return not_gcs
    return None


def resolved(value) -> Location:
    """`location(value)`, absolute: local paths resolved (symlinks followed) as `Path.resolve()` does."""
    place = location(value)
    return place if is_uri(place) else place.resolve()


# The cache an object is read through, always named: gcsfs >= 2026.10 defaults to an "adaptive"
# cache whose background prefetch task stays pending when a file is dropped without close(), as
# pyarrow drops the files it opens through a filesystem. The garbage collector then destroys the
# task wherever it happens to run, logging from inside unrelated code; that crashed a test process
# (CPython 3.11 compiling a module at the time). "readahead" is s3fs's default and was gcsfs's.
READ_CACHE = "readahead"


def open_for_reading(place: UPath, cache_type: str = READ_CACHE):
    """An object on a store opened for reading (seekable; ranged requests) through `cache_type`."""
    return place.fs.open(place.path, "rb", cache_type=cache_type)


def arrow_target(place: Location) -> tuple[str, object]:
    """(path, filesystem) for pyarrow: a local path with no filesystem (pyarrow's own local files), or
    the path inside the store with a pyarrow filesystem over the fsspec one that reaches it, which
    opens objects through READ_CACHE."""
    if is_uri(place):
        return place.path, PyFileSystem(_NamedCacheHandler(place.fs))
    return str(place), None


class _NamedCacheHandler(FSSpecHandler):
    """pyarrow's own handler for an fsspec filesystem, but objects are read through READ_CACHE."""

    def open_input_file(self, path):
        if not self.fs.isfile(path):
            raise FileNotFoundError(path)
        return PythonFile(self.fs.open(path, "rb", cache_type=READ_CACHE), mode="r")

    open_input_stream = open_input_file


def write_whole(final: Location, write: Callable[[Location], None], make_parents: bool = True) -> None:
    """Writes `final` whole or not at all: `write(target)` fills the target.

    Locally a temporary file beside `final` is renamed over it. Object stores have no rename, but
    an object is published only when its upload completes (a PUT, or the last part of a multipart
    upload), so a reader sees the old object or the new one, never half; `write` goes straight to
    the final key there. What makes a shard done is still its marker, written after everything else.
    """
    if is_uri(final):
        write(final)
        return
    if make_parents:
        final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}{TMP_TAG}{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def remove_tree(place: Location) -> None:
    """Deletes a folder (or a prefix in a store) and all under it."""
    if is_uri(place):
        place.fs.rm(place.path, recursive=True)
    else:
        shutil.rmtree(place)


def signature(path: str) -> str:
    """What tells a changed input file from the old one: size and modification time locally, size
    and ETag (the store's content tag; else its modification time) for an object. Raises OSError
    when the file is missing."""
    if not is_uri(path):
        stat = os.stat(path)
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    place = location(path)
    try:
        info = place.fs.info(place.path)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - a store's client errors are not OSErrors
        raise OSError(f"{path}: {first_line(exc)}") from None
    return object_signature(info)


def object_signature(info: dict) -> str:
    """`signature` of an object from its store's listing entry (`fs.info`, `fs.find(detail=True)`):
    its size and content tag, so a listing gives every object's signature without a request each."""
    # S3: ETag; GCS: etag/md5Hash; the Hub: blob_id (the git object id); else a modification time
    tag = next((info[k] for k in ("ETag", "etag", "md5Hash", "blob_id", "LastModified", "mtime", "updated") if info.get(k)), None)
    return f"{info.get('size')}:{tag}"


def is_bucket(place: Location) -> bool:
    """Whether `place` is a store's bucket itself (`s3://b`), not a key or a prefix in one."""
    return is_uri(place) and "/" not in place.path.strip("/")


def is_inside(inner: Location, outer: Location) -> bool:
    """Whether `inner` is `outer` or lies under it (same store; a local path and a URI never overlap)."""
    if is_uri(inner) != is_uri(outer):
        return False
    if not is_uri(inner):
        return inner == outer or inner.is_relative_to(outer)
    if inner.protocol != outer.protocol:
        return False
    a, b = inner.path.rstrip("/"), outer.path.rstrip("/")
    return a == b or a.startswith(b + "/")
