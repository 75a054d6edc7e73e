"""Read the history of an offline W&B run from its ``run-*.wandb`` file, for the tests.

The file is a 7-byte header (``:W&B``, magic, version) then a LevelDB-style log: 32 KiB blocks of
records ``crc32 (4) | length (2, little endian) | type (1) | data``, where type 1 is a whole
record and 2/3/4 the first/middle/last pieces of one split across blocks. Each whole record is a
serialised ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
        else:  # zero padding at the end of the file
            break
    return out


def history(run_dir: Path) -> list[dict]:
    """The logged rows (key -> value) of the offline run in ``run_dir``."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in records(next(Path(run_dir).glob("run-*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows
