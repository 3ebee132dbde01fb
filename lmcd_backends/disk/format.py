"""The disk tier's on-disk format: chunk headers and index-journal records.

Pure encoding and decoding (no I/O, no trio), so that every check a reader
makes is testable on bytes.

A chunk file is one header, padded to a multiple of `BLOCK` bytes, then the
payload, zero-padded to a multiple of `BLOCK` (so that direct I/O can read
and write it whole). The header (little-endian):

    offset  size  field
         0     8  magic b"LMCDCHNK"
         8     2  format version (FORMAT_VERSION)
        10     2  flags (0)
        12     4  header length in bytes (a multiple of BLOCK)
        16     8  payload length (ObjectId.nbytes)
        24     4  CRC32C of the payload
        28     2  layout length L (UTF-8 bytes)
        30     2  reserved (0)
        32     4  key length K
        36     4  reserved (0)
        40     L  layout
      40+L     K  key
    40+L+K     4  CRC32C of bytes [0, 40+L+K) of the header
       ...        zeros up to the header length

The journal (`index.jnl`) is a file header (`JOURNAL_MAGIC`, version) then
records, each `RECORD_MAGIC`, body length, CRC32C of the body, and a body
that is an ObjectId (nbytes u64, layout length u16, key length u32, layout,
key). A record only says "this id was written": the chunk file itself, and
its header and payload checksums, stay the authority.
"""

from __future__ import annotations

import struct

import attrs
from crc32c import crc32c

from lmcd_backends.protocol import ALIGNMENT, ObjectId

BLOCK = ALIGNMENT
MAGIC = b"LMCDCHNK"
FORMAT_VERSION = 1
MAX_LAYOUT_BYTES = 1024
MAX_KEY_BYTES = 64 * 1024

_FIXED = struct.Struct("<8sHHIQIHHII")  # up to and including the reserved u32
_CRC = struct.Struct("<I")

JOURNAL_MAGIC = b"LMCDJRNL"
JOURNAL_VERSION = 1
_JOURNAL_HEADER = struct.Struct("<8sHH")
_RECORD = struct.Struct("<III")  # magic, body length, body CRC32C
RECORD_MAGIC = 0x524A444C  # b"LDJR" little-endian
_ID = struct.Struct("<QHI")


class FormatError(ValueError):
    """Bytes that are not a valid header or record of this format."""


def align_up(n: int, to: int = BLOCK) -> int:
    return (n + to - 1) // to * to


def _id_fields(oid: ObjectId) -> tuple[bytes, bytes]:
    layout = oid.layout.encode()
    if len(layout) > MAX_LAYOUT_BYTES:
        raise FormatError(f"layout tag longer than {MAX_LAYOUT_BYTES} bytes")
    if len(oid.key) > MAX_KEY_BYTES:
        raise FormatError(f"key longer than {MAX_KEY_BYTES} bytes")
    if oid.nbytes <= 0:
        raise FormatError("a chunk must have at least one byte")
    return layout, oid.key


def check_id(oid: ObjectId) -> None:
    """Raise `FormatError` if `oid` cannot be stored in this format."""
    _id_fields(oid)


def header_size(oid: ObjectId) -> int:
    """Bytes the header of `oid` occupies on disk (a multiple of BLOCK)."""
    layout, key = _id_fields(oid)
    return align_up(_FIXED.size + len(layout) + len(key) + _CRC.size)


def file_size(oid: ObjectId) -> int:
    """Bytes the chunk file of `oid` occupies: header plus padded payload."""
    return header_size(oid) + align_up(oid.nbytes)


def encode_header(oid: ObjectId, payload_crc: int) -> bytes:
    """The header of `oid`'s chunk file, `header_size(oid)` bytes long."""
    layout, key = _id_fields(oid)
    size = header_size(oid)
    head = (
        _FIXED.pack(
            MAGIC,
            FORMAT_VERSION,
            0,
            size,
            oid.nbytes,
            payload_crc,
            len(layout),
            0,
            len(key),
            0,
        )
        + layout
        + key
    )
    head += _CRC.pack(crc32c(head))
    return head + bytes(size - len(head))


@attrs.frozen
class Header:
    """A decoded chunk header."""

    oid: ObjectId
    header_size: int
    payload_crc: int


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Decode and check a header (magic, version, lengths, header checksum).

    `data` holds at least the header's first bytes (a whole header for the
    checksum to pass). Raises `FormatError` for anything that is not a
    header this version wrote.
    """
    view = memoryview(data)
    if len(view) < _FIXED.size:
        raise FormatError("short header")
    (magic, version, _flags, size, nbytes, crc, lay_len, _r1, key_len, _r2) = (
        _FIXED.unpack_from(view)
    )
    if magic != MAGIC:
        raise FormatError("not a chunk file (magic)")
    if version != FORMAT_VERSION:
        raise FormatError(f"chunk format version {version}, expected {FORMAT_VERSION}")
    if lay_len > MAX_LAYOUT_BYTES or key_len > MAX_KEY_BYTES:
        raise FormatError("header field lengths out of range")
    end = _FIXED.size + lay_len + key_len
    if size != align_up(end + _CRC.size) or len(view) < end + _CRC.size:
        raise FormatError("header length does not match its fields")
    (stored,) = _CRC.unpack_from(view, end)
    if crc32c(view[:end]) != stored:
        raise FormatError("header checksum mismatch")
    try:
        layout = bytes(view[_FIXED.size : _FIXED.size + lay_len]).decode()
    except UnicodeDecodeError as e:
        raise FormatError("layout tag is not UTF-8") from e
    key = bytes(view[_FIXED.size + lay_len : end])
    if nbytes <= 0:
        raise FormatError("empty payload")
    return Header(ObjectId(key, layout, nbytes), size, crc)


def encode_journal_header() -> bytes:
    return _JOURNAL_HEADER.pack(JOURNAL_MAGIC, JOURNAL_VERSION, 0)


def journal_header_size() -> int:
    return _JOURNAL_HEADER.size


def check_journal_header(data: bytes) -> bool:
    """Whether `data` starts with a journal header of this version."""
    if len(data) < _JOURNAL_HEADER.size:
        return False
    magic, version, _ = _JOURNAL_HEADER.unpack_from(data)
    return bool(magic == JOURNAL_MAGIC and version == JOURNAL_VERSION)


def encode_record(oid: ObjectId) -> bytes:
    """One journal record naming `oid`."""
    layout, key = _id_fields(oid)
    body = _ID.pack(oid.nbytes, len(layout), len(key)) + layout + key
    return _RECORD.pack(RECORD_MAGIC, len(body), crc32c(body)) + body


def decode_records(data: bytes, offset: int) -> tuple[list[ObjectId], int]:
    """The ids recorded in `data[offset:]`, up to the first bad or torn
    record, and the offset where valid records end."""
    view = memoryview(data)
    ids: list[ObjectId] = []
    end = len(data)
    while offset + _RECORD.size <= end:
        magic, length, crc = _RECORD.unpack_from(view, offset)
        body_at = offset + _RECORD.size
        if magic != RECORD_MAGIC or body_at + length > end or length < _ID.size:
            break
        body = view[body_at : body_at + length]
        if crc32c(body) != crc:
            break
        nbytes, lay_len, key_len = _ID.unpack_from(body)
        if _ID.size + lay_len + key_len != length or nbytes <= 0:
            break
        try:
            layout = bytes(body[_ID.size : _ID.size + lay_len]).decode()
        except UnicodeDecodeError:
            break
        ids.append(ObjectId(bytes(body[_ID.size + lay_len :]), layout, nbytes))
        offset = body_at + length
    return ids, offset
