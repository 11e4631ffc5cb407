"""Where datasets live: a local path or an object-store URI (`s3://`, `gs://`, `hf://`).

A location is a `pathlib.Path` for a local path and a `upath.UPath` (pathlib's API over the fsspec
filesystem: s3fs, gcsfs, huggingface_hub's HfFileSystem) for a URI, so code that joins, lists,
reads and writes a dataset is the same for both. Endpoint and credentials come from the standard
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for S3 and S3-compatible stores such as
MinIO; GOOGLE_APPLICATION_CREDENTIALS; HF_TOKEN), read by the filesystems themselves.

Local behaviour is exactly what it was before URIs: every function here returns the `Path` the
old code built, and takes a local branch that does what the old code did.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Union

from upath import UPath

from pipeline.errors import FgdataError, first_line

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
TMP_TAG = ".tmp-"  # in the names of the temporary files of local writes

Location = Union[Path, UPath]


def is_uri(value) -> bool:
    """An object-store location (`s3://...`), as a string or a UPath; `file://` counts as local."""
    if isinstance(value, UPath) and not isinstance(value, Path):  # a local UPath is a Path
        return True
    return isinstance(value, str) and bool(_URI.match(value)) and not value.startswith("file://")


def location(value) -> Location:
    """`value` (a str, Path or UPath) as a location: `Path(value)` when local, a UPath for a URI."""
    if is_uri(value):
        if not isinstance(value, str):
            return value
        try:
            # No listings cache: Ray workers write markers the driver lists, and a cached listing
            # would hide them (or show deleted ones) for the rest of the run.
            return UPath(value.rstrip("/"), use_listings_cache=False)
        except (ImportError, ValueError) as exc:  # an unknown protocol, or its filesystem not installed
            raise FgdataError(f"{value}: no filesystem for this URI ({first_line(exc)}); s3:// needs s3fs, gs:// gcsfs") from None
    if isinstance(value, str) and value.startswith("file://"):
        return Path(value.removeprefix("file://"))
    return Path(value)


def resolved(value) -> Location:
    """`location(value)`, absolute: local paths resolved (symlinks followed) as `Path.resolve()` does."""
    place = location(value)
    return place if is_uri(place) else place.resolve()


def arrow_target(place: Location) -> tuple[str, object]:
    """(path, filesystem) for pyarrow: a local path with no filesystem (pyarrow's own local files), or
    the path inside the store with the fsspec filesystem that reaches it."""
    if is_uri(place):
        return place.path, place.fs
    return str(place), None


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
