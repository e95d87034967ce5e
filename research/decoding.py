"""Image decoding for feature extraction: uint8 decoding in threads, normalisation per batch.

Each image is decoded, resized and centre-cropped by timm's eval transform without its
normalisation, giving a ``uint8`` CHW tensor. Whole batches are then converted to float and
normalised at once with the same operations as timm's ``ToTensor`` and ``Normalize``, so the
inputs are bit-identical to timm's per-image transform.

NOTE: normalising each image on its own with torch's float operations is slow on a busy machine.
On a 2-core host with a load average of about 4, timm's full transform took about 50 ms per
200 px JPEG at 224 px with 2 torch threads, against 2 ms for the uint8 path (torch 2.14.1).
``research bench`` repeats this comparison in its levers table.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import timm
import torch

from research.data import open_rgb

DecodeFn = Callable[[Path], torch.Tensor]


def uint8_transform(data_cfg: dict) -> Callable:
    """Return timm's eval transform for ``data_cfg`` (resize, crop) ending in a ``uint8`` CHW tensor."""
    return timm.data.create_transform(**data_cfg, normalize=False)


def full_transform(data_cfg: dict) -> Callable:
    """Return timm's eval transform for ``data_cfg`` with its per-image float normalisation."""
    return timm.data.create_transform(**data_cfg)


def normalize_batch(batch: torch.Tensor, data_cfg: dict) -> torch.Tensor:
    """Convert a ``uint8`` NCHW batch to float32 and normalise it with the config's mean and std.

    The operations and their order match ``torchvision``'s ``to_tensor`` (divide by 255) and
    ``normalize`` (subtract the mean, divide by the std), so each image equals timm's transform
    output bit for bit.
    """
    if batch.dtype != torch.uint8:
        raise TypeError(f"normalize_batch expects a uint8 batch, got {batch.dtype}; decode with uint8_transform.")
    mean = torch.as_tensor(data_cfg["mean"], dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    std = torch.as_tensor(data_cfg["std"], dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return batch.to(torch.float32).div(255).sub_(mean).div_(std)


def make_decoder(data_cfg: dict) -> DecodeFn:
    """Return a function that decodes one image file to a ``uint8`` CHW tensor."""
    transform = uint8_transform(data_cfg)

    def decode(path: Path) -> torch.Tensor:
        return transform(open_rgb(path))

    return decode


def _chunks(paths: list[Path], batch_size: int) -> list[list[Path]]:
    return [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]


def iter_uint8_batches(
    paths: list[Path], decode: DecodeFn, batch_size: int, num_workers: int, prefetch_batches: int = 2
) -> Iterator[torch.Tensor]:
    """Yield ``uint8`` NCHW batches of ``paths`` in order, decoded by ``num_workers`` threads.

    With ``num_workers >= 1`` the threads decode up to ``prefetch_batches`` batches ahead of the
    consumer, so decoding runs while the backbone computes (PIL releases the GIL while it decodes
    and resizes). With ``num_workers == 0`` each batch is decoded in the calling thread when asked.

    Raises:
        DatasetError: An image cannot be decoded (raised when its batch is reached).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid; it must be at least 1.")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} is invalid; use 0 (decode in the calling thread) or more.")
    chunks = _chunks(paths, batch_size)
    if num_workers == 0:
        for chunk in chunks:
            yield torch.stack([decode(path) for path in chunk])
        return

    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="decode") as pool:
        pending: deque[list[Future]] = deque()
        next_chunk = 0
        try:
            while next_chunk < len(chunks) or pending:
                while next_chunk < len(chunks) and len(pending) < max(prefetch_batches, 1):
                    pending.append([pool.submit(decode, path) for path in chunks[next_chunk]])
                    next_chunk += 1
                futures = pending.popleft()
                yield torch.stack([future.result() for future in futures])
        finally:
            # A consumer that stops early (error or break) must not wait for the queued decodes.
            for futures in pending:
                for future in futures:
                    future.cancel()
