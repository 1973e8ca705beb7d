"""An output folder (local or S3) a batch job writes: whose it is, what it holds, deleting it.

    check_ours(output)   --overwrite deletes only an output this project wrote: it holds SUCCESS_FILE
    files(location)      every file under a folder or prefix
    exists(location)     a file, or a folder holding files
    delete(location)     a file or a folder, whole

Used by batch inference (pipeline.scoring.inference) for its predictions.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from pipeline.errors import InputError
from pipeline.storage import Location, StorageError

SUCCESS_FILE = "_SUCCESS.json"  # written last: the output is complete


def check_ours(output: Location) -> None:
    """--overwrite deletes only a prediction output (it holds SUCCESS_FILE), never other files."""
    if not output.join(SUCCESS_FILE).is_file():
        raise InputError(
            f"--overwrite replaces only predictions jobs/infer.py wrote (they hold {SUCCESS_FILE}); {output.uri} "
            "holds other files: choose another --output, or move them away yourself"
        )


def files(location: Location) -> list[pafs.FileInfo]:
    try:
        entries = location.fs.get_file_info(pafs.FileSelector(location.path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"cannot list {location.uri}: {exc}") from exc
    return [e for e in entries if e.type == pafs.FileType.File]


def exists(location: Location) -> bool:
    kind = location.info().type
    return kind == pafs.FileType.File or (kind == pafs.FileType.Directory and bool(files(location)))


def delete(location: Location) -> None:
    kind = location.info().type
    if kind == pafs.FileType.Directory:
        location.fs.delete_dir(location.path)
    elif kind == pafs.FileType.File:
        location.fs.delete_file(location.path)
