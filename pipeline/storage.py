"""Local paths and s3:// URIs behind one small interface (pyarrow's filesystems).

S3 and S3-compatible stores are configured the usual AWS way: ``AWS_ENDPOINT_URL`` (MinIO, Ceph,
moto, ...), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` or an
instance profile, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``. A ``Location`` pickles with its
filesystem's endpoint and region, never with credentials: every process that uses it finds its
own (see ``s3_filesystem``).
"""

from __future__ import annotations

import os
import posixpath
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.errors import InputError


class StorageError(InputError):
    """A path or bucket that cannot be used; the message names it and says what to check."""


class UnreadableFile(Exception):
    """One file that cannot be read (gone, denied, not a regular file, over the size limit): the job lists
    it with this reason and goes on. A store that does not answer raises OSError instead (a retry may help)."""


DEFAULT_MAX_FILE_BYTES = 64 * 2**20  # an input file larger than this is listed, not read (--max-file-mb)


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # inside fs: "/abs/local/dir" or "bucket/prefix"
    uri: str  # what the user wrote, made absolute: "/abs/local/dir" or "s3://bucket/prefix"

    @property
    def is_local(self) -> bool:
        return self.fs.type_name == "local"

    def join(self, *parts: str) -> Location:
        rel = posixpath.join(*parts)
        return Location(self.fs, posixpath.join(self.path, rel), posixpath.join(self.uri, rel))

    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def at(self, path: str) -> Location:
        """Another path in the same filesystem."""
        return Location(self.fs, path, self.uri_of(path))

    def uri_of(self, path: str) -> str:
        """What users call a path of this filesystem: itself locally, s3://bucket/key in S3."""
        return path if self.is_local else f"s3://{path}"

    def info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri}: {_reason(exc)}") from exc

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def listdir(self) -> list[pafs.FileInfo]:
        """Entries directly under this directory, sorted by name.

        On local disk a name that is not UTF-8 comes back as an entry of type Unknown whose path
        shows the bytes as escapes (see `readable_name`): listed, never a crash of the listing.
        """
        if self.is_local:
            return sorted(_local_entries(self.path, self.uri), key=lambda e: e.path)
        try:
            entries = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"cannot list {self.uri}: {_reason(exc)}") from exc
        return sorted(entries, key=lambda e: e.path)

    def walk(self) -> tuple[list[str], list[tuple[str, str]]]:
        """Every file under this directory (paths, sorted), and what could not be listed: (path, why).
        `stream()` is the same walk one entry at a time."""
        files: list[str] = []
        problems: list[tuple[str, str]] = []
        for path, why in self.stream():
            if why is None:
                files.append(path)
            else:
                problems.append((path, why))
        return sorted(files), sorted(problems)

    def stream(self) -> Iterator[tuple[str, str | None]]:
        """Every file under this directory as (path, None), and what could not be listed as (path, why),
        as the listing goes: a caller holds as many names as it keeps.

        On local disk links to folders are followed once each: a link back up the tree (a loop) or
        a second link to a folder already listed is reported, not listed again; names that are not
        UTF-8 are reported with their bytes escaped. Whatever else is not a folder (links to
        nothing, FIFOs, devices) is listed with the files: reading it (`read_input`) says what it
        is, so a job reports it where it reports any file it could not read. S3 keys are UTF-8 and
        have no links; they come a page (1,000 keys) at a time, in key order.
        """
        if self.is_local:
            yield from _local_walk(self.path)
        else:
            yield from _s3_walk(self)

    def check_writable(self) -> None:
        """An S3 destination's bucket must exist (it is not created behind the user's back)."""
        if self.is_local:
            return
        bucket = self.path.split("/", 1)[0]
        try:
            missing = self.fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError as exc:
            raise StorageError(f"cannot reach s3://{bucket}: {_reason(exc)}") from exc
        if missing:
            raise StorageError(f"bucket s3://{bucket} does not exist (or is not visible with these credentials)")

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_file(self.path) as f:
                return f.read()
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri}: {_reason(exc)}") from exc

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_input(self, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
        """One input file's bytes, at most `max_bytes` of them; UnreadableFile saying why it cannot be
        read (its reason goes into the job's list of bad files or the file's row).

        Locally the file is opened without blocking and checked to be a regular file before it is read
        (a FIFO would block for ever, a device would never end); links to nothing, permission errors
        and files gone since the listing are that file's. On S3 a denied object (a bucket policy, a
        KMS key) or a missing one is that file's; anything else is the store's, and raises OSError.
        """
        if self.is_local:
            return _read_local(self.path, max_bytes)
        try:
            with self.fs.open_input_stream(self.path) as f:
                data = f.read(max_bytes + 1)
        except OSError as exc:
            reason = _file_reason(exc)
            if reason is None:
                raise
            raise UnreadableFile(reason) from exc
        if len(data) > max_bytes:
            raise UnreadableFile(_too_big(None, max_bytes))
        return data

    def write_bytes(self, data: bytes) -> None:
        """Whole or not at all: a local file is renamed into place, an S3 object appears on close."""
        self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
        target = self.path
        if self.is_local:
            target = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(target) as f:
            f.write(data)
        if target != self.path:
            self.fs.move(target, self.path)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))


def check_apart(output: Location, output_flag: str, inputs: dict[str, Location]) -> None:
    """`output` is a place of its own: not the same as, inside, or around an input, nor (locally) the
    filesystem root, the home directory or the working directory; on S3, a prefix, not a bucket.

    What a job writes there (or replaces with --overwrite) then never touches what it reads or
    what the user keeps around it.
    """
    if not output.is_local and "/" not in output.path.strip("/"):
        raise StorageError(
            f"{output_flag} {output.uri} is a bucket root: name a prefix in it ({output.uri.rstrip('/')}/predictions)"
        )
    for name, place in inputs.items():
        if _overlap(output, place):
            where = "is" if _key(output) == _key(place) else "is inside" if _inside(output, place) else "holds"
            raise StorageError(f"{output_flag} {output.uri} {where} {name} {place.uri}: name a separate place")
    if output.is_local:  # inside home or the working directory is where outputs usually go; not the folder itself
        for name, path in (("/", "/"), ("your home directory", "~"), ("the working directory", ".")):
            place = locate(os.path.expanduser(path))
            if _key(output) == _key(place) or _inside(place, output):
                raise StorageError(f"{output_flag} {output.uri} is or holds {name}: name a folder of its own")


def _key(location: Location) -> str:
    return os.path.realpath(location.path) if location.is_local else location.path.strip("/")


def _inside(inner: Location, outer: Location) -> bool:
    return _key(inner).startswith(_key(outer).rstrip("/") + "/")


def _overlap(a: Location, b: Location) -> bool:
    return a.is_local == b.is_local and (_key(a) == _key(b) or _inside(a, b) or _inside(b, a))


def _read_local(path: str, max_bytes: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        gone = os.path.islink(path)
        raise UnreadableFile(
            "a link to nothing" if gone else "file not found: gone since the input was listed"
        ) from None
    except PermissionError:
        raise UnreadableFile("permission denied: this job's user may not read it") from None
    except OSError as exc:
        raise UnreadableFile(f"cannot be opened: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(fd)
        raise UnreadableFile(
            f"not a regular file ({_kind(info.st_mode)})"
            if not stat.S_ISREG(info.st_mode)
            else _too_big(info.st_size, max_bytes)
        )
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:  # an I/O error of the disk under this one file
            raise UnreadableFile(f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # it grew since its size was read
        raise UnreadableFile(_too_big(None, max_bytes))
    return data


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a file")


def _too_big(size: int | None, max_bytes: int) -> str:
    what = f"{size:,} bytes" if size is not None else "larger"
    return f"{what}, over the {max_bytes / 2**20:.3g} MiB limit for one file (--max-file-mb): not read"


def _file_reason(exc: OSError) -> str | None:
    """Why one S3 object cannot be read, when the error is the object's; None when it is the store's."""
    text = str(exc)
    if isinstance(exc, FileNotFoundError) or "NoSuchKey" in text or "Path does not exist" in text:
        return "file not found: gone since the input was listed"
    if any(mark in text for mark in ("ACCESS_DENIED", "AccessDenied", "KMS", "Forbidden", "HTTP status 403")):
        return f"access denied: {text.splitlines()[0]}"
    return None


def locate(uri: str | os.PathLike) -> Location:
    """A local path (relative or absolute, ~ expanded) or an s3:// URI."""
    text = str(uri)
    if text.startswith("s3://"):
        bucket = text[len("s3://") :].split("/", 1)[0]
        if not bucket:
            raise StorageError(f"{text!r} names no bucket; write s3://BUCKET/PREFIX")
        try:
            fs = s3_filesystem()
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot open {text}: {_reason(exc)}; check AWS_ENDPOINT_URL and credentials") from exc
        return Location(fs, text[len("s3://") :].rstrip("/"), text.rstrip("/"))
    if "://" in text:
        raise StorageError(f"{text!r}: only local paths and s3:// URIs are supported")
    path = os.path.abspath(os.path.expanduser(text))
    return Location(pafs.LocalFileSystem(), path, path)


def s3_filesystem() -> pafs.S3FileSystem:
    """S3 where the driver's AWS variables say it is (endpoint, region), with no credentials in it.

    Pickled to Ray tasks on other nodes it carries the endpoint and region only: each process finds
    its credentials where it runs, by the AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
    AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws, web identity (IRSA), the instance profile), which
    also renews expiring session credentials. Keys are never frozen into a pickled filesystem.
    """
    env = os.environ.get
    options = {
        "endpoint_override": env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
        "region": env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
    }
    return pafs.S3FileSystem(**{k: v for k, v in options.items() if v})


NOT_UTF8 = "its name is not UTF-8 (shown with \\x escapes): rename it to read it"


def readable_name(name: str) -> str | None:
    """None for a UTF-8 name; else the name with its undecodable bytes as \\xNN escapes."""
    try:
        name.encode("utf-8")
        return None
    except UnicodeEncodeError:  # os.scandir decodes other bytes as lone surrogates
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def not_utf8(entry: pafs.FileInfo) -> bool:
    """An entry `Location.listdir` made for a local name that is not UTF-8 (its escaped path is not on disk)."""
    return entry.type == pafs.FileType.Unknown and "\\x" in entry.base_name and not os.path.lexists(entry.path)


def _local_entries(path: str, uri: str) -> list[pafs.FileInfo]:
    try:
        with os.scandir(path) as it:
            found = list(it)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot list {uri}: {exc.strerror or exc}") from exc
    entries = []
    for entry in found:
        shown = readable_name(entry.name)
        if shown is not None:
            entries.append(pafs.FileInfo(posixpath.join(path, shown), pafs.FileType.Unknown))
            continue
        try:
            kind = pafs.FileType.Directory if entry.is_dir() else pafs.FileType.File if entry.is_file() else None
            size = entry.stat().st_size if kind == pafs.FileType.File else None
        except OSError:  # a dangling link, or gone meanwhile
            kind, size = None, None
        entries.append(pafs.FileInfo(entry.path, kind or pafs.FileType.Unknown, size=size))
    return entries


def _local_walk(root: str) -> Iterator[tuple[str, str | None]]:
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            stat = os.stat(folder)
            if (stat.st_dev, stat.st_ino) in seen:
                yield folder, "a link to a folder already listed (a link loop?): not listed again"
                continue
            seen.add((stat.st_dev, stat.st_ino))
            with os.scandir(folder) as it:
                found = list(it)
        except OSError as exc:
            yield folder, f"cannot be listed: {exc.strerror or exc}"
            continue
        folders = []
        for entry in sorted(found, key=lambda e: e.name):  # depth first in name order: the same walk every time
            shown = readable_name(entry.name)
            if shown is not None:
                yield posixpath.join(folder, shown), NOT_UTF8
            elif entry.is_dir():
                folders.append(entry.path)
            else:  # files, and links to nothing, FIFOs, devices: whoever reads them says what they are
                yield entry.path, None
        stack.extend(reversed(folders))


def _s3_walk(location: Location) -> Iterator[tuple[str, None]]:
    """The keys under an S3 prefix, a page at a time (boto3's paginator: pyarrow lists a prefix whole)."""
    import boto3
    import botocore.exceptions

    bucket, _, prefix = location.path.partition("/")
    env = os.environ.get
    client = boto3.client(
        "s3",
        endpoint_url=env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
        region_name=env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
    )
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
    try:
        for page in pages:
            for entry in page.get("Contents", ()):
                if not entry["Key"].endswith("/"):  # a folder marker a console made
                    yield f"{bucket}/{entry['Key']}", None
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise StorageError(f"cannot list {location.uri}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return "the bucket does not exist"
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "InvalidAccessKeyId" in text:
        return "access denied (check AWS credentials)"
    if "Could not resolve host" in text or "Couldn't connect" in text or "connect" in text.lower():
        return f"the store is unreachable ({text.splitlines()[0]}); check AWS_ENDPOINT_URL"
    return text.splitlines()[0] if text else type(exc).__name__
