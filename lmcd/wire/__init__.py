"""The wire edge: frames in, request objects out; reply values in, frames out."""

from lmcd.wire.codec import (
    Header,
    PayloadError,
    decode_header,
    decode_request,
    encode_reply,
    failure_reply,
)
from lmcd.wire.types import CacheKey, RequestType

__all__ = [
    "CacheKey",
    "Header",
    "PayloadError",
    "RequestType",
    "decode_header",
    "decode_request",
    "encode_reply",
    "failure_reply",
]
