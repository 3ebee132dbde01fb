"""The CUDA path: KV caches opened by CUDA IPC, copied with streams and events.

Per instance there are two streams: a gather stream that first waits on the
client's IPC event and then gathers the chunk's blocks into a staging buffer
(scatters, for RETRIEVE), and a copy stream that moves staging <-> pinned
host memory on the copy engine. Two staging buffers alternate, so the gather
of one batch overlaps the copy of the last. The last operation records an
interprocess event whose handle is the reply. `store` and `retrieve` return
that event as an `EventCompletion`: the scheduler commits (or unpins) when
it has completed, polling it without blocking Trio.

Everything here runs in a worker thread.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from typing import Any

import attrs

from lmcd.errors import RegistrationError
from lmcd.transfer.completion import EventCompletion
from lmcd.transfer.host import torch_dtype
from lmcd.transfer.layouts import KVLayout, written_blocks
from lmcd.wire.types import CudaTensorRef

log = logging.getLogger(__name__)

DEFAULT_STAGING_BYTES = 256 << 20


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _device_for(ref: CudaTensorRef) -> int:
    import torch

    if ref.device_uuid is None:
        assert ref.device is not None
        if ref.device >= torch.cuda.device_count():
            raise RegistrationError(f"no CUDA device {ref.device} here")
        return ref.device
    # lmcache sends str(props.uuid); nvidia-smi spells it with a "GPU-" prefix.
    wanted = ref.device_uuid.removeprefix("GPU-")
    for index in range(torch.cuda.device_count()):
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        if uuid.removeprefix("GPU-") == wanted:
            return index
    raise RegistrationError(
        f"device {ref.device_uuid} is not visible to lmcd (check CUDA_VISIBLE_DEVICES)"
    )


@attrs.define(slots=True)
class CudaKV:
    """An opened CUDA KV cache with its streams and staging buffers."""

    layout: KVLayout
    device: int
    layers: list[Any]  # per layer: a [K, num_blocks, block_row] view
    gather_stream: Any
    copy_stream: Any
    staging_bytes: int
    _staging: list[Any] = attrs.field(factory=list)
    _free: list[Any] = attrs.field(factory=list)  # event per staging buffer
    # Serializes the issue of one request's work onto the shared streams.
    issue_lock: threading.Lock = attrs.field(factory=threading.Lock)

    def close(self) -> None:
        import torch

        self.layers.clear()
        self._staging.clear()
        self._free.clear()
        with torch.cuda.device(self.device):
            torch.cuda.empty_cache()

    def staging(self, index: int, chunk_tokens: int) -> tuple[Any, Any, int]:
        """Staging buffer `index` (0 or 1), its free event, and its chunk count."""
        import torch

        layout = self.layout
        per_chunk = layout.chunk_bytes(chunk_tokens)
        batch = max(1, self.staging_bytes // per_chunk)
        if not self._staging:
            for _ in range(2):
                self._staging.append(
                    torch.empty(
                        (
                            layout.planes,
                            layout.num_layers,
                            batch * chunk_tokens,
                            layout.hidden,
                        ),
                        dtype=torch_dtype(layout.dtype),
                        device=self.device,
                    )
                )
                self._free.append(None)
        return self._staging[index], self._free[index], batch

    def set_free(self, index: int, event: Any) -> None:
        self._free[index] = event


def open_cuda_kv(refs: Sequence[CudaTensorRef], staging_bytes: int) -> CudaKV:
    """Open each layer's IPC handle. Raises `RegistrationError` without CUDA,
    for an unknown device, a handle that cannot be opened, or layers that
    differ in shape, dtype or device."""
    if not cuda_available():
        raise RegistrationError(
            "CUDA is not available to lmcd: cannot open CUDA IPC KV caches "
            "(CPU clients register host tensors, extension code 2)"
        )
    import torch

    layout = KVLayout.detect([r.shape for r in refs], [r.dtype for r in refs])
    devices = {_device_for(r) for r in refs}
    if len(devices) != 1:
        raise RegistrationError("KV cache layers are on different devices")
    device = devices.pop()
    layers = []
    try:
        with torch.cuda.device(device):
            for ref in refs:
                storage = torch.UntypedStorage._new_shared_cuda(device, *ref.handle[1:])
                t = torch.empty(0, dtype=torch_dtype(ref.dtype), device=device)
                t.set_(storage)
                # The shared storage may be larger than the tensor in it.
                t = t[: math.prod(ref.shape)].view(ref.shape)
                layers.append(
                    t.view(layout.planes, layout.num_blocks, layout.block_row)
                )
            gather_stream = torch.cuda.Stream(device=device)
            copy_stream = torch.cuda.Stream(device=device)
    except RegistrationError:
        raise
    except Exception as e:  # torch raises RuntimeError/TypeError for bad handles
        raise RegistrationError(f"cannot open CUDA IPC memory: {e}") from e
    return CudaKV(layout, device, layers, gather_stream, copy_stream, staging_bytes)


def _client_event(kv: CudaKV, handle: bytes) -> Any:
    import torch

    try:
        return torch.cuda.Event.from_ipc_handle(kv.device, handle)
    except Exception as e:
        raise RegistrationError(f"cannot open the client's CUDA event: {e}") from e


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def store(
    kv: CudaKV,
    event_handle: bytes,
    chunks: Sequence[tuple[Sequence[int], Any]],
    chunk_tokens: int,
) -> EventCompletion:
    """Issue GPU -> pinned copies of `chunks` (`[(block_ids, uint8 buffer)]`).

    Returns the completion of the interprocess event that completes when
    every copy is done (its handle is the reply), keeping alive the tensors
    the copies use until then.
    """
    import torch

    layout = kv.layout
    keep: list[Any] = []
    with kv.issue_lock, torch.cuda.device(kv.device):
        kv.gather_stream.wait_event(_client_event(kv, event_handle))
        for k, batch in enumerate(
            _batches(len(chunks), kv.staging(0, chunk_tokens)[2])
        ):
            buf, free, _ = kv.staging(k % 2, chunk_tokens)
            if free is not None:
                kv.gather_stream.wait_event(free)
            ids = [b for i in batch for b in chunks[i][0]]
            tokens = len(ids) * layout.block_size
            with torch.cuda.stream(kv.gather_stream):
                index = torch.tensor(ids, dtype=torch.long).to(kv.device)
                keep.append(index)
                for layer, src in enumerate(kv.layers):
                    for plane in range(layout.planes):
                        out = buf[plane, layer, :tokens].view(
                            len(ids), layout.block_row
                        )
                        torch.index_select(src[plane], 0, index, out=out)
                ready = torch.cuda.Event()
                ready.record(kv.gather_stream)
            kv.copy_stream.wait_event(ready)
            with torch.cuda.stream(kv.copy_stream):
                for j, i in enumerate(batch):
                    blocks = len(chunks[i][0])
                    t0 = j * chunk_tokens
                    src_view = buf[:, :, t0 : t0 + blocks * layout.block_size]
                    dest = _host_view(layout, chunks[i][1], blocks * layout.block_size)
                    dest.copy_(src_view, non_blocking=True)
                freed = torch.cuda.Event()
                freed.record(kv.copy_stream)
            kv.set_free(k % 2, freed)
        done = torch.cuda.Event(interprocess=True)
        done.record(kv.copy_stream)
        handle = bytes(done.ipc_handle())
    return EventCompletion(done, handle, keep)


def retrieve(
    kv: CudaKV,
    event_handle: bytes,
    chunks: Sequence[tuple[Sequence[int], Any]],
    chunk_tokens: int,
    skip: Sequence[int] = (),
) -> EventCompletion:
    """Issue pinned -> GPU copies of `chunks` and the scatter into their
    blocks; returns the completion, as `store` does. `skip[i]` (when given)
    is chunk i's first token to write: the engine holds the ones before."""
    import torch

    layout = kv.layout
    keep: list[Any] = []
    with kv.issue_lock, torch.cuda.device(kv.device):
        kv.gather_stream.wait_event(_client_event(kv, event_handle))
        for k, batch in enumerate(
            _batches(len(chunks), kv.staging(0, chunk_tokens)[2])
        ):
            buf, free, _ = kv.staging(k % 2, chunk_tokens)
            if free is not None:
                kv.copy_stream.wait_event(free)
            with torch.cuda.stream(kv.copy_stream):
                for j, i in enumerate(batch):
                    blocks = len(chunks[i][0])
                    t0 = j * chunk_tokens
                    src = _host_view(layout, chunks[i][1], blocks * layout.block_size)
                    buf[:, :, t0 : t0 + blocks * layout.block_size].copy_(
                        src, non_blocking=True
                    )
                ready = torch.cuda.Event()
                ready.record(kv.copy_stream)
            kv.gather_stream.wait_event(ready)
            rows = len(batch) * chunk_tokens // layout.block_size
            ids: list[int] = []
            src_at: list[int] = []
            partial: list[tuple[int, int, int]] = []
            for j, i in enumerate(batch):
                base = j * chunk_tokens // layout.block_size
                first = skip[i] if skip else 0
                for p, block, row0 in written_blocks(
                    chunks[i][0], layout.block_size, first
                ):
                    if row0:
                        partial.append((base + p, block, row0 * layout.hidden))
                    else:
                        ids.append(block)
                        src_at.append(base + p)
            whole = src_at == list(range(rows))
            with torch.cuda.stream(kv.gather_stream):
                index = torch.tensor(ids, dtype=torch.long).to(kv.device)
                keep.append(index)
                if not whole:
                    src_index = torch.tensor(src_at, dtype=torch.long).to(kv.device)
                    keep.append(src_index)
                for layer, dest in enumerate(kv.layers):
                    for plane in range(layout.planes):
                        src_rows = buf[plane, layer, : rows * layout.block_size].view(
                            rows, layout.block_row
                        )
                        if ids:
                            dest[plane].index_copy_(
                                0,
                                index,
                                src_rows if whole else src_rows[src_index],
                            )
                        # A block cut by the skip: only its later tokens.
                        for row, block, at in partial:
                            dest[plane][block, at:].copy_(src_rows[row, at:])
                freed = torch.cuda.Event()
                freed.record(kv.gather_stream)
            kv.set_free(k % 2, freed)
        done = torch.cuda.Event(interprocess=True)
        done.record(kv.gather_stream)
        handle = bytes(done.ipc_handle())
    return EventCompletion(done, handle, keep)


def _host_view(layout: KVLayout, buffer: Any, tokens: int) -> Any:
    nbytes = layout.chunk_bytes(tokens)
    typed = buffer[:nbytes].view(torch_dtype(layout.dtype))
    return typed.view(layout.planes, layout.num_layers, tokens, layout.hidden)
