"""An output folder (local or S3) written whole or not at all: staged beside it, then moved into place.

    check_ours(output)                    --overwrite replaces only an output this project wrote: it
                                          holds SUCCESS_FILE (or REPLACING_FILE, a replacement that
                                          stopped half way)
    move_into_place(staging, output, ...) the finished staging folder at `output`; locally the old
                                          output renamed aside until the new one is in (and back if
                                          that fails); on S3, where nothing renames, the output marked
                                          REPLACING_FILE while its objects are replaced, the staging
                                          copy kept until the copy is complete

On a failure OutputNotReplaced says where the whole new output is and what is left at `output`.
Used by batch inference (pipeline.scoring.inference) for its predictions.
"""

from __future__ import annotations

import json
import posixpath
import uuid

import pyarrow.fs as pafs

from pipeline.errors import InputError
from pipeline.storage import Location, StorageError

SUCCESS_FILE = "_SUCCESS.json"  # written last: the output is complete
REPLACING_FILE = "_REPLACING.json"  # an S3 output whose objects a job was replacing when it stopped


class OutputNotReplaced(InputError):
    """The new output is whole in its staging location, which is kept; the message says where."""


def check_ours(output: Location) -> None:
    """--overwrite deletes only a prediction output (it holds SUCCESS_FILE, or REPLACING_FILE where a
    replacement stopped half way), never other files."""
    if not (output.join(SUCCESS_FILE).is_file() or output.join(REPLACING_FILE).is_file()):
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


def move_into_place(staging: Location, output: Location, overwrite: bool) -> None:
    """Put the finished predictions in `staging` (SUCCESS_FILE included) at `output`, whole.

    On any failure OutputNotReplaced says where the new predictions are (staging, kept) and what
    is at `output`: locally the previous output, untouched; on S3 a partial output marked with
    REPLACING_FILE, which a later --overwrite replaces.
    """
    replacing = exists(output)
    if replacing:
        if not overwrite:
            raise OutputNotReplaced(
                f"output {output.uri} appeared while the job ran; nothing was replaced. The predictions are "
                f"whole at {staging.uri}: move them yourself, or rerun with another --output"
            )
        check_ours(output)
    try:
        if output.is_local:
            _rename_into_place(staging, output, replacing)
        else:
            _copy_into_place(staging, output, replacing)
    except (OSError, StorageError) as exc:
        if output.is_local:
            left = f"{output.uri} is as it was" if replacing else f"nothing was written at {output.uri}"
        else:
            left = f"{output.uri} is partial (marked {REPLACING_FILE}: --overwrite replaces it)"
        raise OutputNotReplaced(
            f"could not put the predictions at {output.uri} ({_first_line(exc)}): {left}. The new predictions "
            f"are whole at {staging.uri}: move them there yourself, or rerun with --overwrite"
        ) from exc


def _rename_into_place(staging: Location, output: Location, replacing: bool) -> None:
    """Local disk: the previous output renamed aside, the new one renamed in, then the old one deleted."""
    fs = output.fs
    fs.create_dir(posixpath.dirname(output.path.rstrip("/")), recursive=True)
    aside = output.at(f"{output.path.rstrip('/')}.old-{uuid.uuid4().hex[:8]}")
    if replacing:
        fs.move(output.path, aside.path)
    try:
        fs.move(staging.path, output.path)
    except OSError:
        if replacing:
            fs.move(aside.path, output.path)
        raise
    if replacing:
        delete(aside)


def _copy_into_place(staging: Location, output: Location, replacing: bool) -> None:
    """S3: the output marked REPLACING_FILE, the old objects deleted (their SUCCESS_FILE first), the new
    ones copied (theirs last), the mark removed. Readers never see a SUCCESS_FILE over mixed objects."""
    marker = output.join(REPLACING_FILE)
    marker.write_text(json.dumps({"staging": staging.uri}) + "\n")
    if replacing:
        old = [e.path for e in files(output) if e.path != marker.path]
        for path in sorted(old, key=lambda p: not p.endswith(SUCCESS_FILE)):
            output.fs.delete_file(path)
    new = sorted((e.path for e in files(staging)), key=lambda p: p.endswith(SUCCESS_FILE))
    for path in new:
        output.fs.copy_file(path, output.path + path[len(staging.path) :])
    output.fs.delete_file(marker.path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def delete(location: Location) -> None:
    kind = location.info().type
    if kind == pafs.FileType.Directory:
        location.fs.delete_dir(location.path)
    elif kind == pafs.FileType.File:
        location.fs.delete_file(location.path)
