"""Where training metrics go: stdout, ``metrics.jsonl`` and TensorBoard event files.

Only process 0 writes. On resume, lines past the restored step are dropped
from the JSON-lines files, so each file reads as one uninterrupted run even
when a crash lost steps after the last checkpoint.

TensorBoard needs no TensorFlow: an event file is a TFRecord stream of
``Event`` protocol buffers, and a scalar event is four small fields, written
here by hand (:class:`EventFileWriter`).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------ TensorBoard


def _crc32c_table() -> list[int]:
    # Castagnoli polynomial, reflected (as TFRecord uses).
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; records here are small, so pure Python is fine."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    # TFRecord stores a rotated, offset CRC so that CRCs of CRCs stay well-distributed.
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def scalar_event(step: int, values: Mapping[str, float], wall_time: float) -> bytes:
    """A serialised ``tensorflow.Event`` with ``summary.value[i] = {tag, simple_value}``.

    Field numbers (tensorflow/core/util/event.proto, summary.proto): Event.wall_time=1
    (double), Event.step=2 (int64), Event.summary=5; Summary.value=1;
    Value.tag=1 (string), Value.simple_value=2 (float).
    """
    summary = b"".join(
        _bytes_field(
            1,
            _bytes_field(1, tag.encode("utf-8")) + _field(2, 5) + struct.pack("<f", float(v)),
        )
        for tag, v in values.items()
    )
    return (
        _field(1, 1)
        + struct.pack("<d", wall_time)
        + _field(2, 0)
        + _varint(int(step))
        + _bytes_field(5, summary)
    )


def _file_version_event(wall_time: float) -> bytes:
    # Event.file_version=3: readers check the first record for "brain.Event:2".
    return _field(1, 1) + struct.pack("<d", wall_time) + _bytes_field(3, b"brain.Event:2")


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", _masked_crc(length))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


class EventFileWriter:
    """Appends scalar summaries to ``logdir/events.out.tfevents.<time>.<host>``.

    Args:
      logdir: the TensorBoard log directory (created).
    """

    def __init__(self, logdir: str | os.PathLike):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self.path = Path(logdir) / name
        self._file = open(self.path, "ab")  # noqa: SIM115 (closed in close())
        self._file.write(tfrecord(_file_version_event(now)))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Writes one event with all ``values`` at ``step``."""
        self._file.write(tfrecord(scalar_event(step, values, time.time())))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------ JSON lines


def truncate_jsonl(path: str | os.PathLike, phase: str, after_step: int) -> None:
    """Drops the records of ``phase`` with ``step > after_step`` (a resumed run redoes them).

    Records of other phases and lines that are not JSON objects are kept.
    """
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(rec, dict) and rec.get("phase") == phase and rec.get("step", 0) > after_step:
            continue
        kept.append(line)
    path.write_text("".join(k + "\n" for k in kept))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSON-lines file (a missing file is empty)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Writes metrics to ``workdir/metrics.jsonl``, TensorBoard and (via ``echo``) stdout.

    Args:
      workdir: the run directory.
      enabled: False on every process but 0 (all methods become no-ops).
      echo: function printing a line (e.g. ``tqdm.write``); None for silence.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, echo=print):
        self.enabled = enabled
        self.echo = echo
        self.metrics_path = Path(workdir) / "metrics.jsonl"
        self.batches_path = Path(workdir) / "batches.jsonl"
        self._tb = EventFileWriter(Path(workdir) / "tensorboard") if enabled else None

    def resume(self, phase: str, step: int) -> None:
        """Forgets records of ``phase`` after ``step`` (the step a run resumed from)."""
        if self.enabled:
            truncate_jsonl(self.metrics_path, phase, step)
            truncate_jsonl(self.batches_path, phase, step)

    def write(self, phase: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs one record: a line on stdout, a JSON line and TensorBoard scalars."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        _append(self.metrics_path, {"phase": phase, "step": int(step), **values})
        self._tb.scalars(int(step), {f"{phase}/{k}": v for k, v in values.items()})
        if self.echo is not None:
            text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            self.echo(f"[{phase}] step {step}: {text}")

    def batch_digest(self, phase: str, step: int, digest: str) -> None:
        """Records which data a step trained on (for checking exact resumption)."""
        if self.enabled:
            _append(self.batches_path, {"phase": phase, "step": int(step), "digest": digest})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _append(path: Path, record: Mapping[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
