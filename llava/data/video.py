"""Videos in records: a file read with PyAV, `frames` frames sampled uniformly over it.

A record's video is a `Video` among its media, where its `<video>` tag is (llava.data.formats
puts it there). Frames are decoded only when a sample is loaded, in the loader's workers; the
token count of a video does not depend on its size or length (llava.data.media.VideoSampling),
so the data pipeline never opens a video at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Video:
    """A record's video file."""

    path: str


def frame_indices(total: int, frames: int) -> list[int]:
    """`frames` indices spread evenly from the first frame to the last (LLaVA-NeXT's sampling,
    numpy.linspace rounded down); a video of fewer frames repeats some."""
    if total < 1:
        raise ValueError("the video has no frames")
    return np.linspace(0, total - 1, frames, dtype=int).tolist()


def read_frames(video: Video, frames: int) -> list[Image.Image]:
    """`frames` RGB frames of `video`, sampled uniformly; a missing, unreadable or empty file is
    a ValueError naming it."""
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency
        raise ValueError("reading videos needs PyAV: pip install av") from None
    if not os.path.isfile(video.path):
        raise ValueError(f"video file {video.path!r} not found")
    try:
        with av.open(video.path) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            total = container.streams.video[0].frames or count_packets(container)
        with av.open(video.path) as container:
            kept = decode_at(container, frame_indices(total, frames))
    except av.error.FFmpegError as error:
        raise ValueError(f"cannot read video file {video.path!r}: {error}") from None
    except ValueError as error:
        raise ValueError(f"video file {video.path!r}: {error}") from None
    return kept


def count_packets(container) -> int:
    """The frames of the first video stream, counted without decoding (containers that do not
    record the count)."""
    return sum(1 for packet in container.demux(video=0) if packet.size)


def decode_at(container, indices: list[int]) -> list[Image.Image]:
    """The frames at `indices` (sorted, repeats allowed), decoding only up to the last one; a
    stream that ends early (its frame count was an estimate) gives its last frame for the rest."""
    wanted = set(indices)
    found: dict[int, Image.Image] = {}
    frame = None
    for position, frame in enumerate(container.decode(video=0)):
        if position in wanted:
            found[position] = frame.to_image().convert("RGB")
        if position >= indices[-1]:
            break
    if frame is None:
        raise ValueError("the video has no frames")
    last = frame.to_image().convert("RGB")
    return [found.get(i, last) for i in indices]
