"""What W&B (offline) and TensorBoard leave on disk, read back for the tracker tests.

A W&B run folder's ``run-ID.wandb`` is a LevelDB-style log of ``Record`` protocol buffers after a
7-byte W&B header; wandb itself no longer ships a Python reader, so it is read here. TensorBoard's
event files are read with TensorBoard's own loader.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024  # LevelDB log blocks; a record's 7-byte header never straddles two
_HEADER = 7  # crc32 (4), length (2), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[Any]:
    """The ``wandb_internal_pb2.Record`` messages of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = 7, b""
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:  # the block's zero padding
            position += left_in_block
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        if kind in (_FIRST, _MIDDLE):
            pending = (pending if kind == _MIDDLE else b"") + chunk
            continue
        if kind not in (_FULL, _LAST):
            break  # zeros past the last record
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending + chunk if kind == _LAST else chunk)
        pending = b""
        yield record


def wandb_written(path: Path) -> bool:
    """Whether W&B's service wrote the whole run (its exit record): it writes the file on its
    own, and may still be at it when ``run.finish()`` returns."""
    return any(record.WhichOneof("record_type") == "exit" for record in wandb_records(path))


def wandb_history(path: Path) -> list[dict[str, Any]]:
    """Each ``run.log(...)`` of the run, as the dict that was logged."""
    return [
        {_key(item): json.loads(item.value_json) for item in record.history.item}
        for record in wandb_records(path)
        if record.WhichOneof("record_type") == "history"
    ]


def wandb_config(path: Path) -> dict[str, Any]:
    """The run's config, as its updates left it."""
    config: dict[str, Any] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "config":
            config.update(
                {_key(item): json.loads(item.value_json) for item in record.config.update}
            )
    return config


def _key(item: Any) -> str:
    return str(item.key or "/".join(item.nested_key))


def tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    """Every scalar of the event files in ``folder``, by tag, in the order written."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    scalars: dict[str, list[float]] = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    number = float(tensor_util.make_ndarray(value.tensor))
                    scalars.setdefault(value.tag, []).append(number)
    return scalars
