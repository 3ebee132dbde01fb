"""Helpers around the real lmcache 0.3.13 client."""

from __future__ import annotations

from typing import Any

TIMEOUT = 10.0


def call(client: Any, name: str, payloads: list[Any], timeout: float = TIMEOUT) -> Any:
    """Send one request with the real client and wait for its decoded reply."""
    from lmcache.v1.multiprocess.protocol import RequestType, get_response_class

    rtype = RequestType[name]
    future = client.submit_request(rtype, payloads, get_response_class(rtype))
    return future.result(timeout)


def key(h: int, worker: int | None = 0, world: int = 1, model: str = "m") -> Any:
    from lmcache.v1.multiprocess.custom_types import IPCCacheEngineKey

    return IPCCacheEngineKey(model, world, worker, h.to_bytes(8, "big"))


def open_client(url: str, context: Any) -> Any:
    from lmcache.v1.multiprocess.mq import MessageQueueClient

    return MessageQueueClient(url, context)


def close_client(client: Any) -> None:
    """Close the client and the two inproc sockets its own close() leaves open."""
    client.close()
    client.task_notifier.close(linger=0)
    client.task_waiter.close(linger=0)
