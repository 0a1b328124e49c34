"""Read back what an offline W&B run logged, from its ``run-*.wandb`` file (no network, no server).

The file is W&B's transaction log: a 7-byte header (":W&B", magic, version), then LevelDB-style log records
in 32 KiB blocks, each chunk with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)
and a serialized ``wandb_internal_pb2.Record`` as payload.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def _records(data: bytes) -> list[bytes]:
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer too small for a header: zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            records.append(payload)
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            records.append(pending + payload)
    return records


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """``{"history": [ {key: value}, ... ], "summary": {key: value}, "config": {key: value}, "tags": [...],
    "name": str, "group": str}`` of an offline run (a ``.wandb`` file or the ``offline-run-*`` folder holding
    one). ``config`` merges the run record's config with later config updates (W&B's ``_wandb`` left out)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        path = next(path.glob("*.wandb"))
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    meta: dict[str, Any] = {"tags": [], "name": None, "group": None}

    def items(updates) -> dict[str, Any]:
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in updates}

    for raw in _records(path.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append(items(rec.history.item))
        elif kind == "summary":
            summary.update(items(rec.summary.update))
        elif kind == "run":
            config.update(items(rec.run.config.update))
            meta = {"tags": list(rec.run.tags), "name": rec.run.display_name, "group": rec.run.run_group}
        elif kind == "config":
            config.update(items(rec.config.update))
    config.pop("_wandb", None)
    return {"history": history, "summary": summary, "config": config, **meta}
