"""Lists the images `fgdata ingest` can read, with their captions, in a deterministic order.

Four layouts: a folder of images with `.txt`/`.json` sidecars; img2dataset's "files" output
(`00000.parquet` + `00000/000000000.jpg` + sidecars); img2dataset's webdataset tars; and a
Parquet/CSV table of image paths and captions. Listing reads captions, never image bytes. Each may
be a local path or lie on an object store (a URI): one listing of the prefix, then only the
objects it names, read through the store's filesystem.

Every candidate image becomes exactly one SourceItem: one that cannot be used carries its
`problem`, so the stage rejects it with a reason and nothing is skipped silently. Policies:
- Only regular files (or symlinks to them) are ever opened; a directory, FIFO, device or socket
  with an image name is rejected as `not_a_file` (opening a FIFO waits forever for a writer).
  Symlinked folders are not entered (no loops, nothing outside SOURCE is read).
- A caption sidecar that exists but is unusable (not a regular file, unreadable, over
  MAX_SIDECAR_BYTES, not UTF-8, JSON that does not parse or nests too deep, a caption field that
  is not text) rejects its image as `bad_caption_sidecar`: keeping the image would silently drop
  its caption. A null caption field counts as no caption (img2dataset writes null).
- A file name that is not valid UTF-8 is kept: its key and `source` show each undecodable byte as
  `\\xNN` (Python's "backslashreplace"), since Parquet strings must be UTF-8. A name that clashes
  with a literal `\\xNN` spelling is a `duplicate_key` reject, never a lost row.
- A table names each image relative to its own folder, by absolute path, or by URI (read through
  that store). In a table on an object store an absolute local path (`/data/x.jpg`) is an
  `unsafe_path` reject (each worker would read its own disk), and so is `..` above the bucket.
- A file named only by its suffix (`.jpg`) has nothing to strip: its key keeps the suffix.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import BinaryIO

import pandas as pd
import pyarrow.parquet as pq

from pipeline.config import IngestConfig
from pipeline.core import storage
from pipeline.errors import FgdataError, first_line

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
FORMATS = ("auto", "folder", "img2dataset", "webdataset", "table")
# A sidecar is alt-text plus some metadata (img2dataset adds EXIF); anything larger is not one,
# and reading it whole would let one file exhaust a worker's memory.
MAX_SIDECAR_BYTES = 1 << 20


@dataclass(frozen=True)
class SourceItem:
    """One image to ingest. `problem` is set when the listing already knows it must be rejected."""

    key: str
    path: str  # image file, or the tar holding it (as the OS names it: may hold surrogate escapes)
    member: str | None = None  # member name inside the tar
    span: tuple[int, int] | None = None  # (offset, size) of the member's bytes in the tar
    caption: str | None = None
    problem: tuple[str, str] | None = None  # (reason, detail)
    # On an object store: the object's size and ETag (the tar's for a member), so a changed object
    # changes the shard's fingerprint. None for local files.
    signature: str | None = None

    def __repr__(self) -> str:
        # The dataclass repr, with `signature` only when set: a shard's fingerprint hashes this
        # repr, and fingerprints of local runs stay what they were before objects had signatures.
        shown = [f for f in fields(self) if f.name != "signature" or self.signature is not None]
        return f"{type(self).__qualname__}({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in shown)})"


class NotRegularFile(OSError):
    """The path is a directory, FIFO, device or socket, which fgdata never opens."""


def escape_undecodable(text: str) -> str:
    """`text` as valid UTF-8: bytes of a file name that are not UTF-8 (held by Python as
    surrogate escapes) become `\\xNN`; any other lone surrogate becomes `\\udXXX`."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _file_kind(mode: int) -> str:
    for is_kind, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if is_kind(mode):
            return name
    return "not a regular file"


def _object_info(path: str) -> dict:
    """The store's metadata of the object `path` (a URI); FileNotFoundError when there is none,
    NotRegularFile when it is a prefix (a "folder"), OSError for any other failure."""
    place = storage.location(path)
    try:
        info = place.fs.info(place.path)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - a store client's errors are not OSErrors
        raise OSError(f"{path}: {first_line(exc)}") from None
    if info.get("type") != "file":
        raise NotRegularFile(f"{path} is a directory, not a file")
    return info


def open_regular_file(path: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file (symlinks followed); raises OSError
    (NotRegularFile for a directory, FIFO, device or socket) otherwise. A URI opens the object
    through its store's filesystem (seekable; reads are ranged requests)."""
    if storage.is_uri(path):
        _object_info(path)
        place = storage.location(path)
        return storage.open_for_reading(place)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(f"{escape_undecodable(path)} is {_file_kind(mode)}, not a file")
    # O_NONBLOCK: should a FIFO replace the file after the stat, open returns at once instead of
    # waiting for a writer; the fstat then refuses it.
    handle = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
    mode = os.fstat(handle.fileno()).st_mode
    if not stat.S_ISREG(mode):
        handle.close()
        raise NotRegularFile(f"{escape_undecodable(path)} is {_file_kind(mode)}, not a file")
    return handle


def read_regular_file(path: str, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file `path`; OSError when it is not one, cannot be read, or
    holds more than `max_bytes`."""
    if storage.is_uri(path):
        size = _object_info(path).get("size") or 0
        if max_bytes is not None and size > max_bytes:  # known before reading: never fetched whole
            raise OSError(f"{path} is larger than {max_bytes} bytes")
        place = storage.location(path)
        try:
            return place.fs.cat_file(place.path)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise OSError(f"{path}: {first_line(exc)}") from None
    with open_regular_file(path) as handle:
        data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise OSError(f"{escape_undecodable(path)} is larger than {max_bytes} bytes")
    return data


class OutsideRoot(ValueError):
    """A path named by the data leads outside the folder it must stay in."""


def path_inside(root: storage.Location, relative: str) -> storage.Location:
    """The path `relative` names under `root`, resolved (links followed). Raises OutsideRoot when
    it leads outside `root` (an absolute path, `..`, a link), and OSError / ValueError /
    RuntimeError when it cannot be resolved (a NUL byte, a name too long, a link loop).
    Under a URI root (a store has no links) the same names are refused: `/...`, a `..` part, a NUL."""
    if storage.is_uri(root):
        if "\0" in relative:
            raise ValueError("embedded null byte")
        parts = relative.split("/")
        if relative.startswith("/") or storage.is_uri(relative) or ".." in parts:
            raise OutsideRoot(f"{relative!r} leads outside {root}")
        return root.joinpath(*[p for p in parts if p not in ("", ".")])
    path = (Path(root) / relative).resolve()
    if not path.is_relative_to(root):
        raise OutsideRoot(f"{relative!r} leads outside {root}")
    return path


def detect_format(source: Path) -> str:
    source = storage.location(source) if isinstance(source, str) else source
    if source.is_file():
        if source.suffix.lower() in (".csv", ".parquet"):
            return "table"
        raise FgdataError(f"{source} is a file but not a .csv or .parquet table of image paths")
    if not source.is_dir():
        raise FgdataError(f"{source} is not a folder or a table file" if source.exists() else f"{source} does not exist")
    if any(source.glob("*.tar")):
        return "webdataset"
    if any((source / p.stem).is_dir() for p in source.glob("*.parquet")):
        return "img2dataset"
    return "folder"


def list_items(source: Path, fmt: str, config: IngestConfig) -> list[SourceItem]:
    source = storage.resolved(source)
    if fmt == "auto":
        fmt = detect_format(source)
    listers = {"folder": _list_folder, "img2dataset": _list_img2dataset, "webdataset": _list_webdataset, "table": _list_table}
    if fmt not in listers:
        raise FgdataError(f"unknown source format {fmt!r}; choose one of {', '.join(FORMATS)}")
    items = listers[fmt](source, config)
    if not items:
        raise FgdataError(f"{source} ({fmt}) holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return _mark_duplicate_keys(items)


def _mark_duplicate_keys(items: list[SourceItem]) -> list[SourceItem]:
    # Keys must be unique across the whole dataset, so duplicates are found here, on the
    # driver, not per shard. A usable item comes first in the sort so that a broken file (a
    # directory named x.jpg) never takes the key from a good image; after that, sorted order.
    items = sorted(items, key=lambda item: (item.key, item.problem is not None, item.path, item.member or ""))
    marked, previous = [], None
    for item in items:
        if item.key == previous:
            also = f"; it is also unusable: {item.problem[1]}" if item.problem else ""
            item = replace(item, problem=("duplicate_key", f"key {item.key!r} is already used by another image{also}"))
        marked.append(item)
        previous = item.key
    return marked


def _image_suffix(name: str) -> str | None:
    """The image suffix `name` ends with, as spelled (`.JPG`), or None."""
    lower = name.lower()
    return next((name[-len(s) :] for s in IMAGE_SUFFIXES if lower.endswith(s)), None)


def _parse_caption(data: bytes, is_json: bool, fields: list[str]) -> str | None:
    """The caption in a .txt or .json sidecar's bytes; ValueError when there is none usable."""
    text = data.decode("utf-8")
    if not is_json:
        return text
    try:
        record = json.loads(text)
    except RecursionError:
        raise ValueError("the JSON nests too deeply") from None
    if not isinstance(record, dict):
        raise ValueError(f"the JSON is a {type(record).__name__}, not an object")
    for name in fields:
        value = record.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"field {name!r} is a {type(value).__name__}, not text")
        return value
    return None


def _sidecar_caption(image_name: str, sidecar: str | None, fields: list[str]) -> tuple[str | None, tuple[str, str] | None]:
    if sidecar is None:
        return None, None
    try:
        data = read_regular_file(sidecar, MAX_SIDECAR_BYTES)
        return _parse_caption(data, sidecar.lower().endswith(".json"), fields), None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, ("bad_caption_sidecar", f"cannot read the caption sidecar of {escape_undecodable(image_name)}: {escape_undecodable(str(exc))}")


def _not_a_file(path: str) -> tuple[str, str] | None:
    """Why `path` cannot be read as an image file, from its metadata alone; None if it can."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        target = os.readlink(path) if os.path.islink(path) else None
        detail = f"a symbolic link to {escape_undecodable(target)}, which does not exist" if target else "it disappeared while listing"
        return "missing_file", detail
    except OSError as exc:  # a symlink loop, a name too long, ...
        return "unreadable_file", escape_undecodable(str(exc))
    if not stat.S_ISREG(mode):
        return "not_a_file", f"{escape_undecodable(os.path.basename(path))} is {_file_kind(mode)}, not a file"
    return None


def _folder_items(folder: Path, config: IngestConfig, key_of) -> list[SourceItem]:
    """One item per name with an image suffix under `folder`, whatever kind of file it is.
    `key_of(relative_path, suffix)` gives the key."""
    if storage.is_uri(folder):
        return _object_items(folder, config, key_of)
    items: list[SourceItem] = []

    def unreadable_folder(error: OSError) -> None:
        relative = os.path.relpath(error.filename, folder)
        detail = f"cannot list the folder, so its images are not known: {escape_undecodable(str(error.strerror or error))}"
        items.append(SourceItem(key=escape_undecodable(relative), path=error.filename, problem=("unreadable_folder", detail)))

    # followlinks=False: a symlink to a folder is not entered (loops, reads outside SOURCE).
    for root, dirs, files in os.walk(folder, onerror=unreadable_folder):
        names = set(dirs) | set(files)
        by_lower = {name.lower(): name for name in sorted(names, reverse=True)}
        for name in sorted(names):
            suffix = _image_suffix(name)
            if suffix is None:
                continue
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            problem = _not_a_file(path)
            caption = None
            if problem is None:
                stem = name[: -len(suffix)]
                sidecar = _find_sidecar(stem, names, by_lower)
                caption, problem = _sidecar_caption(name, sidecar and os.path.join(root, sidecar), config.caption_fields)
            items.append(SourceItem(key=escape_undecodable(key_of(relative, suffix)), path=path, caption=caption, problem=problem))
    return items


def _object_items(folder, config: IngestConfig, key_of) -> list[SourceItem]:
    """`_folder_items` on an object store: one listing of every object and prefix under `folder`
    (with sizes and ETags), the same keys, sidecar rules and rejects. A store has no links, FIFOs
    or devices; a prefix with an image name (`x.jpg/...`) is `not_a_file`, and a sidecar's size is
    checked from the listing before it is fetched."""
    fs, root = folder.fs, folder.path.rstrip("/")
    try:
        listing = fs.find(root, withdirs=True, detail=True)
    except Exception as exc:  # noqa: BLE001 - a store client's errors are not OSErrors
        raise FgdataError(f"{folder}: cannot list it ({first_line(exc)})") from None
    by_folder: dict[str, dict[str, dict]] = {}
    for path, info in listing.items():
        relative = path.rstrip("/")[len(root) + 1 :]
        if relative:
            parent, _, name = relative.rpartition("/")
            by_folder.setdefault(parent, {})[name] = info
    items: list[SourceItem] = []
    for parent in sorted(by_folder):
        entries = by_folder[parent]
        names = set(entries)
        by_lower = {name.lower(): name for name in sorted(names, reverse=True)}
        for name in sorted(names):
            suffix = _image_suffix(name)
            if suffix is None:
                continue
            relative = f"{parent}/{name}" if parent else name
            info, caption, problem = entries[name], None, None
            if info.get("type") != "file":
                problem = ("not_a_file", f"{escape_undecodable(f'{folder}/{relative}')} is a directory, not a file")
            else:
                sidecar = _find_sidecar(name[: -len(suffix)], names, by_lower)
                caption, problem = _sidecar_caption(name, sidecar and f"{folder}/{parent + '/' if parent else ''}{sidecar}", config.caption_fields)
            items.append(
                SourceItem(
                    key=escape_undecodable(key_of(relative, suffix)),
                    path=f"{folder}/{relative}",
                    caption=caption,
                    problem=problem,
                    signature=storage.object_signature(info),
                )
            )
    return items


def _find_sidecar(stem: str, names: set[str], by_lower: dict[str, str]) -> str | None:
    # .txt before .json; the exact spelling before another case (x.TXT).
    for wanted in (f"{stem}.txt", f"{stem}.json"):
        if wanted in names:
            return wanted
        if wanted.lower() in by_lower:
            return by_lower[wanted.lower()]
    return None


def _strip_suffix(relative: str, suffix: str) -> str:
    stripped = relative[: -len(suffix)]
    return relative if stripped == "" or stripped.endswith("/") else stripped


def _list_folder(source: Path, config: IngestConfig) -> list[SourceItem]:
    return _folder_items(source, config, key_of=_strip_suffix)


def _list_img2dataset(source: Path, config: IngestConfig) -> list[SourceItem]:
    # img2dataset names every file by its key; its per-shard parquet also lists the rows whose
    # download failed, which have no file: they become rejects so the counts add up, and so
    # does a row marked success whose file is missing.
    items = _folder_items(source, config, key_of=lambda relative, suffix: _strip_suffix(relative, suffix).rpartition("/")[2])
    present = {item.key for item in items}
    for table_path in sorted(source.glob("*.parquet")):
        where, filesystem = storage.arrow_target(table_path)  # on a store, only these columns are fetched
        columns = pq.read_schema(where, filesystem=filesystem).names
        if not {"key", "status"} <= set(columns):
            continue
        wanted = [c for c in ("key", "status", "error_message", "caption") if c in columns]
        for index, row in enumerate(pq.read_table(where, columns=wanted, filesystem=filesystem).to_pylist()):
            key = _cell_text(row["key"]) or f"{table_path.stem}-row-{index}"
            if key in present:
                continue
            if row["status"] == "success":
                problem = ("missing_file", f"img2dataset lists it as downloaded, but {table_path.stem}/{key}.* is not there")
            else:
                problem = ("download_failed", f"img2dataset could not download it: {row.get('error_message') or row['status']}")
            caption = row.get("caption") if isinstance(row.get("caption"), str) else None
            items.append(SourceItem(key=key, path=str(table_path), caption=caption, problem=problem))
    return items


def _list_webdataset(source: Path, config: IngestConfig) -> list[SourceItem]:
    return [item for tar_path in sorted(source.glob("*.tar")) for item in _tar_items(source, tar_path, config)]


def _tar_items(source: Path, tar_path: Path, config: IngestConfig) -> list[SourceItem]:
    """One item per member with an image suffix. A damaged tar keeps the members listed before
    the damage (a member cut short is rejected when read) and adds one `unreadable_tar` reject,
    keyed by the tar's name, for whatever came after it; the other tars are not affected."""
    key = escape_undecodable(tar_path.name if storage.is_uri(tar_path) else tar_path.relative_to(source).as_posix())
    try:
        signature = storage.signature(str(tar_path)) if storage.is_uri(tar_path) else None
        handle = open_regular_file(str(tar_path))
    except OSError as exc:
        return [SourceItem(key=key, path=str(tar_path), problem=("unreadable_tar", escape_undecodable(str(exc))))]
    images: list[tuple[str, tarfile.TarInfo]] = []
    captions: dict[str, tarfile.TarInfo] = {}
    items, damage = [], None
    with handle:
        try:
            # "r:" reads uncompressed tars only, so member offsets are file offsets: members are
            # read later by offset, which works even when the tar is cut short further on.
            with tarfile.open(fileobj=handle, mode="r:") as tar:
                for member in tar:
                    # webdataset: the sample key is the member path up to the first dot of its basename
                    folder, _, base = member.name.rpartition("/")
                    stem, _, extension = base.partition(".")
                    prefix = f"{folder}/{stem}" if folder else stem
                    if _image_suffix(base):
                        images.append((prefix, member))
                    elif extension.lower() in ("txt", "json"):
                        captions.setdefault(prefix, member)
        except (tarfile.TarError, OSError) as exc:
            damage = exc
        for prefix, member in images:
            problem, caption = _member_problem(member), None
            if problem is None and prefix in captions:
                caption, problem = _member_caption(handle, captions[prefix], member.name, config.caption_fields)
            items.append(
                SourceItem(
                    key=escape_undecodable(prefix if prefix.rpartition("/")[2] else member.name),  # ".jpg" has no stem
                    path=str(tar_path),
                    member=member.name,
                    span=(member.offset_data, member.size),
                    caption=caption,
                    problem=problem,
                    signature=signature,
                )
            )
    if damage is not None:
        detail = f"the tar is damaged after {len(images)} image members (those are ingested): {damage}"
        items.append(SourceItem(key=key, path=str(tar_path), problem=("unreadable_tar", escape_undecodable(detail))))
    return items


def _member_problem(member: tarfile.TarInfo) -> tuple[str, str] | None:
    if member.isfile() and not member.issparse():
        return None
    kind = "a sparse file" if member.isfile() else "a directory" if member.isdir() else "a link" if member.issym() or member.islnk() else "not a file"
    return "not_a_file", f"tar member {escape_undecodable(member.name)} is {kind}"


def read_member(handle: BinaryIO, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of an open tar; OSError when the tar ends before them."""
    total = getattr(handle, "size", None)  # an object store's file knows its size; a local one is asked
    available = max(0, (os.fstat(handle.fileno()).st_size if total is None else total) - offset)
    if available < size:  # checked first: a damaged header can claim any size
        raise OSError(f"the tar ends after {available} of the member's {size} bytes")
    handle.seek(offset)
    return handle.read(size)


def _member_caption(handle: BinaryIO, member: tarfile.TarInfo, image_name: str, fields: list[str]) -> tuple[str | None, tuple[str, str] | None]:
    try:
        problem = _member_problem(member)
        if problem:
            raise OSError(problem[1])
        if member.size > MAX_SIDECAR_BYTES:
            raise OSError(f"{member.size} bytes is more than a caption ({MAX_SIDECAR_BYTES})")
        data = read_member(handle, member.offset_data, member.size)
        return _parse_caption(data, member.name.lower().endswith(".json"), fields), None
    except (OSError, ValueError) as exc:
        return None, ("bad_caption_sidecar", f"cannot read the caption of {escape_undecodable(image_name)}: {escape_undecodable(str(exc))}")


def _cell_text(value) -> str | None:
    """A table cell as text; None for null, NaN and empty (pandas turns a null into NaN, which
    must not become the key or path "nan")."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    text = os.fsdecode(value) if isinstance(value, bytes) else str(value)
    return text or None


def _read_table(source) -> pd.DataFrame:
    with source.open("rb") as handle:  # a local file or one object on a store, read the same way
        return pd.read_csv(handle, dtype=str, keep_default_na=False) if source.suffix.lower() == ".csv" else pd.read_parquet(handle)


def _table_image_path(source, raw_path: str, index: int):
    """(where the image a table cell names is, problem): a URI as itself; a path relative to the
    table's folder; an absolute path as itself, except in a table on a store (see the module docstring)."""
    if storage.is_uri(raw_path):
        try:
            return storage.location(raw_path), None
        except FgdataError as exc:  # a protocol with no filesystem here
            return None, ("bad_image_path", f"row {index} of {source.name}: {exc}")
    if not storage.is_uri(source):
        path = Path(raw_path)
        return (path if path.is_absolute() else source.parent / path), None
    if raw_path.startswith("/"):
        return None, ("unsafe_path", f"row {index} of {source.name} names the local path {raw_path!r}, but the table is on an object store; name images relative to the table or by URI")
    # a store keeps `..` literally: resolved here, and never above the bucket
    inside = posixpath.normpath(f"{source.parent.path}/{raw_path}")
    if inside.startswith("../") or inside == "..":
        return None, ("unsafe_path", f"row {index} of {source.name}: {raw_path!r} leads outside the bucket")
    return storage.location(f"{source.protocol}://{inside}"), None


def _list_table(source: Path, config: IngestConfig) -> list[SourceItem]:
    if not source.is_file():  # a FIFO would block the reader forever
        raise FgdataError(f"{source} is not a table file")
    try:
        frame = _read_table(source)
    except Exception as exc:  # noqa: BLE001 - pandas raises many types for a bad file
        raise FgdataError(f"{source}: cannot read the table ({exc})") from None
    image_column = next((c for c in config.image_fields if c in frame.columns), None)
    if image_column is None:
        raise FgdataError(f"{source}: no image path column; expected one of {config.image_fields} (ingest.image_fields)")
    caption_column = next((c for c in config.caption_fields if c in frame.columns), None)
    items = []
    for index, row in enumerate(frame.to_dict("records")):
        raw_path = _cell_text(row[image_column])
        path, problem = _table_image_path(source, raw_path, index) if raw_path else (None, None)
        key = _cell_text(row.get("key")) or (path.with_suffix("").name if path else f"row-{index}")
        if raw_path is None:
            problem = ("missing_image_path", f"row {index} of {source.name} has no {image_column}")
        caption = row.get(caption_column) if caption_column else None
        if caption is not None and not isinstance(caption, str):
            if _cell_text(caption) is None:
                caption = None
            else:
                caption, problem = None, problem or ("bad_caption", f"row {index}: {caption_column} is a {type(caption).__name__}, not text")
        items.append(SourceItem(key=escape_undecodable(key), path=str(path or source), caption=caption, problem=problem))
    return items
