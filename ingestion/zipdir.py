"""A ZIP archive's entry count, read from its directory records before zipfile lists it.

``zipfile.ZipFile`` builds a ``ZipInfo`` object for every central-directory record as it
opens an archive: a 50 MB upload of a million tiny records costs seconds and hundreds of
megabytes before any check could run. Office formats are ZIPs, and detection opens them
in the API process, so the count is bounded first, from two cheap facts:

- the End Of Central Directory record's total entry count (the ZIP64 one when the
  classic record says 0xFFFF), which is what the archive claims;
- the number of central-directory signatures in the bytes the directory spans, which is
  at least what zipfile would really build (a lying count cannot slip through).
"""

from __future__ import annotations

import io
import struct
import zipfile

from ingestion.errors import UnsafeDocumentError

_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_LOCATOR_SIZE = 20
_ZIP64_EOCD = b"PK\x06\x06"
_CENTRAL_HEADER = b"PK\x01\x02"
_MAX_COMMENT = 0xFFFF


def entry_count(data: bytes) -> int | None:
    """The larger of the entries the archive claims and the central-directory records its
    directory holds; None if no End Of Central Directory record is found (not a ZIP
    zipfile could open)."""
    end = data.rfind(_EOCD, max(0, len(data) - _EOCD_SIZE - _MAX_COMMENT))
    if end < 0 or len(data) - end < _EOCD_SIZE:
        return None
    claimed, cd_size = (int(v) for v in struct.unpack_from("<10xHI", data, end))
    cd_end = end
    zip64 = _zip64_record(data, end)
    if zip64 is not None:
        cd_end, (claimed, cd_size) = zip64
    records = data.count(_CENTRAL_HEADER, max(0, cd_end - cd_size), cd_end)
    return max(claimed, records)


def _zip64_record(data: bytes, end: int) -> tuple[int, tuple[int, int]] | None:
    """(where the ZIP64 end record starts, (its entry count, directory size)), if any."""
    locator = end - _ZIP64_LOCATOR_SIZE
    if locator < 0 or data[locator:locator + 4] != _ZIP64_LOCATOR:
        return None
    # The record sits right before its locator (zipfile assumes the same).
    record = locator - 56
    if record < 0 or data[record:record + 4] != _ZIP64_EOCD:
        return None
    claimed, cd_size = struct.unpack_from("<32xQQ", data, record)
    return record, (int(claimed), int(cd_size))


def open_bounded(data: bytes, max_entries: int, what: str = "ZIP archive") -> zipfile.ZipFile:
    """``zipfile.ZipFile`` over ``data``, once its entry count is known to be at most
    ``max_entries``; raises `UnsafeDocumentError` above it (zipfile's own errors pass)."""
    count = entry_count(data)
    if count is not None and count > max_entries:
        raise UnsafeDocumentError(
            f"{what} has {count:,} entries in its directory; the limit is {max_entries:,}")
    return zipfile.ZipFile(io.BytesIO(data))
