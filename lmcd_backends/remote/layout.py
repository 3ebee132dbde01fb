"""How a chunk is laid out in a Valkey keyspace (sans-IO: no sockets, no trio).

A chunk of `ObjectId` `oid` is stored as

- parts: `<prefix>{<oid.name()>}:<write id>:<i>`, the payload cut into
  `part_size` pieces (the last may be shorter), raw bytes, no header;
- a manifest: `<prefix>{<oid.name()>}:m`, written last and only if absent
  (`SET NX`), carrying the full id, the length, the part size and count,
  the write id and a CRC32C per part, itself closed by a CRC32C.

The hash tag `{name}` puts every key of a chunk in one slot, so one node
holds the whole chunk: losing a node loses its share of the chunks instead
of a part of every chunk, and a chunk's keys can be read in one pipelined
round trip. Parts are named by the write id of the write that made them,
so a reader that found a manifest reads exactly that write's parts: a
chunk is never assembled from two writes, and a missing or altered part
makes it a miss.
"""

from __future__ import annotations

import binascii
import struct

import attrs

from lmcd_backends.protocol import ObjectId

MAGIC = b"LMVK"
VERSION = 1
WRITE_ID_BYTES = 8
_HEAD = struct.Struct(
    "<4sHH8sQIIIH"
)  # magic ver flags wid nbytes psize parts klen llen
_CRC = struct.Struct("<I")
MAX_KEY_BYTES = 64 * 1024
MAX_LAYOUT_BYTES = 1024
SLOTS = 16384


class ManifestError(ValueError):
    """A manifest that does not decode or does not belong to the id read."""


@attrs.frozen
class Manifest:
    """What the manifest of one write of a chunk says."""

    oid: ObjectId
    part_size: int
    write_id: bytes
    crcs: tuple[int, ...]

    @property
    def parts(self) -> int:
        return len(self.crcs)

    def part_range(self, i: int) -> tuple[int, int]:
        """(offset, length) of part `i` in the chunk."""
        start = i * self.part_size
        return start, min(self.part_size, self.oid.nbytes - start)


def part_count(nbytes: int, part_size: int) -> int:
    """Parts of a chunk of `nbytes` (at least one, for an empty chunk too)."""
    return max(1, -(-nbytes // part_size))


def encode_manifest(m: Manifest) -> bytes:
    layout = m.oid.layout.encode()
    if len(m.write_id) != WRITE_ID_BYTES:
        raise ValueError("write id must be 8 bytes")
    if m.parts != part_count(m.oid.nbytes, m.part_size):
        raise ValueError("part count does not match the length and part size")
    if len(m.oid.key) > MAX_KEY_BYTES or len(layout) > MAX_LAYOUT_BYTES:
        raise ValueError("object id too long for a manifest")
    # fmt: off
    body = b"".join(
        [
            _HEAD.pack(
                MAGIC, VERSION, 0, m.write_id, m.oid.nbytes, m.part_size,
                m.parts, len(m.oid.key), len(layout),
            ),
            m.oid.key,
            layout,
            struct.pack(f"<{m.parts}I", *m.crcs),
        ]
    )
    # fmt: on
    return body + _CRC.pack(crc32c(body))


def decode_manifest(data: bytes, expected: ObjectId) -> Manifest:
    """Decode and check a manifest read for `expected`; raises
    `ManifestError` if it is damaged, of another version, or of another id
    (another key, layout or length)."""
    if len(data) < _HEAD.size + _CRC.size:
        raise ManifestError("manifest too short")
    body, (crc,) = data[: -_CRC.size], _CRC.unpack(data[-_CRC.size :])
    if crc32c(body) != crc:
        raise ManifestError("manifest checksum mismatch")
    magic, version, _flags, wid, nbytes, psize, parts, klen, llen = _HEAD.unpack_from(
        body
    )
    if magic != MAGIC or version != VERSION:
        raise ManifestError(f"not a version-{VERSION} lmcd manifest")
    end = _HEAD.size + klen + llen + 4 * parts
    if psize <= 0 or end != len(body) or parts != part_count(nbytes, psize):
        raise ManifestError("manifest fields are inconsistent")
    key = body[_HEAD.size : _HEAD.size + klen]
    try:
        layout = body[_HEAD.size + klen : _HEAD.size + klen + llen].decode()
    except UnicodeDecodeError:
        raise ManifestError("manifest layout is not UTF-8") from None
    oid = ObjectId(bytes(key), layout, nbytes)
    if oid != expected:
        raise ManifestError("manifest belongs to another object id")
    crcs = struct.unpack_from(f"<{parts}I", body, _HEAD.size + klen + llen)
    return Manifest(oid, psize, bytes(wid), tuple(crcs))


@attrs.frozen
class KeySpace:
    """Key names under one deployment's `prefix`."""

    prefix: bytes = b"lmcd:"

    def __attrs_post_init__(self) -> None:
        if b"{" in self.prefix or b"}" in self.prefix:
            raise ValueError("the key prefix may not contain '{' or '}'")

    def tag(self, oid: ObjectId) -> bytes:
        return b"{" + oid.name().encode() + b"}"

    def manifest(self, oid: ObjectId) -> bytes:
        return self.prefix + self.tag(oid) + b":m"

    def part(self, oid: ObjectId, write_id: bytes, i: int) -> bytes:
        return self.prefix + self.tag(oid) + b":%s:%d" % (write_id.hex().encode(), i)

    def parts(self, m: Manifest) -> list[bytes]:
        return [self.part(m.oid, m.write_id, i) for i in range(m.parts)]

    def slot(self, oid: ObjectId) -> int:
        """The cluster slot of every key of `oid` (the hash of its tag)."""
        return key_slot(oid.name().encode())


def key_slot(key: bytes) -> int:
    """The cluster hash slot of `key` (CRC16/XMODEM mod 16384), honouring a
    `{hash tag}` as the cluster does."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    # CRC-CCITT with a zero start is the cluster's CRC16/XMODEM.
    return binascii.crc_hqx(key, 0) % SLOTS


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C of `data` (hardware accelerated, releases the GIL)."""
    import crc32c as _crc

    return int(_crc.crc32c(data))
