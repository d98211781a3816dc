"""The trainer's data store: readings from ``fabwatch.sensors`` -> Parquet files partitioned by day.

Durability order: a file is written to a temporary name, fsynced, renamed into ``day=YYYY-MM-DD/``,
and only then are the consumer's offsets committed. A crash between the rename and the commit
re-reads those readings on restart; ``load`` drops the duplicates by (entity, ts).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from confluent_kafka import Consumer

from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.kafka.lifecycle import has_data
from fabwatch.stream.schemas import ReadingDecoder, Rejected

log = logging.getLogger("fabwatch.store")


@dataclass
class StoreStats:
    rows_written: int = 0
    files_written: int = 0
    skipped_invalid: int = 0


class ReadingStore:
    """Day-partitioned Parquet files under ``root`` with columns entity, ts, <features>, label."""

    def __init__(self, root: Path | str, feature_names: Sequence[str]):
        self.root = Path(root)
        self.feature_names = list(feature_names)

    def _schema(self) -> pa.Schema:
        return pa.schema([("entity", pa.string()), ("ts", pa.int64())]
                         + [(f, pa.float32()) for f in self.feature_names] + [("label", pa.int8())])

    def write(self, entity: list[str], ts: np.ndarray, values: np.ndarray, label: np.ndarray) -> list[Path]:
        """Write one file per day touched by these rows, atomically. Returns the files written."""
        days = (ts // 86_400_000).astype(np.int64)
        written = []
        for day in np.unique(days):
            sel = np.flatnonzero(days == day)
            cols = {"entity": pa.array([entity[i] for i in sel], pa.string()), "ts": pa.array(ts[sel], pa.int64())}
            cols.update({f: pa.array(values[sel, j], pa.float32()) for j, f in enumerate(self.feature_names)})
            cols["label"] = pa.array(label[sel], pa.int8())
            table = pa.table(cols, schema=self._schema())
            date = datetime.fromtimestamp(int(day) * 86_400, timezone.utc).strftime("%Y-%m-%d")
            folder = self.root / f"day={date}"
            folder.mkdir(parents=True, exist_ok=True)
            final = folder / f"part-{time.time_ns()}-{uuid.uuid4().hex[:6]}.parquet"
            tmp = folder / f".{final.name}.tmp"
            pq.write_table(table, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            written.append(final)
        return written

    def files(self) -> list[Path]:
        return sorted(self.root.glob("day=*/part-*.parquet"))

    def rows(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.files())

    def load(self, recent_days: int | None = None, older_sample: int = 0, seed: int = 0) -> pa.Table:
        """Readings of the last ``recent_days`` days present, plus a uniform sample of ``older_sample``
        older rows (the reservoir), deduplicated by (entity, ts) and sorted by entity then ts."""
        by_day: dict[str, list[Path]] = {}
        for p in self.files():
            by_day.setdefault(p.parent.name, []).append(p)
        days = sorted(by_day)
        recent = days if recent_days is None else days[-recent_days:]
        older = [d for d in days if d not in recent]
        parts = [pq.read_table(p, schema=self._schema()) for d in recent for p in by_day[d]]
        if older and older_sample > 0:
            old = pa.concat_tables([pq.read_table(p, schema=self._schema()) for d in older for p in by_day[d]])
            if old.num_rows > older_sample:
                rng = np.random.default_rng(seed)
                old = old.take(np.sort(rng.choice(old.num_rows, older_sample, replace=False)))
            parts.append(old)
        if not parts:
            return self._schema().empty_table()
        table = pa.concat_tables(parts)
        table = table.sort_by([("entity", "ascending"), ("ts", "ascending")])
        ent = table.column("entity").to_numpy(zero_copy_only=False)
        ts = table.column("ts").to_numpy()
        keep = np.r_[True, (ent[1:] != ent[:-1]) | (ts[1:] != ts[:-1])]
        return table.filter(pa.array(keep))

    def recent(self, window_ms: int) -> pa.Table:
        """Readings of the ``window_ms`` of event time that end at the newest reading held (so a replayed
        history is judged like live data). Not deduplicated: a reading re-read after a crash counts twice,
        which a distribution barely notices."""
        files = self.files()
        if not files:
            return self._schema().empty_table()
        newest_day = datetime.strptime(files[-1].parent.name.removeprefix("day="), "%Y-%m-%d")
        first = (newest_day - timedelta(milliseconds=window_ms)).strftime("day=%Y-%m-%d")
        table = pa.concat_tables([pq.read_table(p, schema=self._schema()) for p in files if p.parent.name >= first])
        if not table.num_rows:
            return table
        cutoff = pc.max(table.column("ts")).as_py() - window_ms
        return table.filter(pc.greater(table.column("ts"), cutoff))

    def enforce_retention(self, max_age_days: float | None = None, max_bytes: int | None = None,
                          now_ms: int | None = None) -> int:
        """Delete whole days older than ``max_age_days``, then the oldest files beyond ``max_bytes``.

        Without ``now_ms``, age counts from the end of the newest day held or from the wall clock,
        whichever is earlier: replayed history is kept like live data, and a day dated in the future
        (which the writer's clock-skew bounds keep out) cannot make every real day look old."""
        removed = 0
        files = self.files()
        if now_ms is None:
            now_ms = int(time.time() * 1000)
            if files:
                newest = datetime.strptime(files[-1].parent.name.removeprefix("day="), "%Y-%m-%d")
                now_ms = min(now_ms, int(newest.replace(tzinfo=timezone.utc).timestamp() * 1000) + 86_400_000)
        if max_age_days is not None:
            cutoff = datetime.fromtimestamp((now_ms / 1000) - max_age_days * 86_400, timezone.utc).strftime("%Y-%m-%d")
            for p in files:
                if p.parent.name.removeprefix("day=") < cutoff:
                    p.unlink()
                    removed += 1
            files = self.files()
        if max_bytes is not None:
            sizes = [p.stat().st_size for p in files]
            total = sum(sizes)
            for p, size in zip(files, sizes):  # oldest day first, then oldest file
                if total <= max_bytes:
                    break
                p.unlink()
                total -= size
                removed += 1
        for d in self.root.glob("day=*"):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        return removed


class StoreWriter:
    """Consume readings into a ReadingStore with its own consumer group; commit after each durable file.

    ``poll_once`` must run at least every ``max.poll.interval.ms`` or the group takes the partitions
    away and the next commit fails; a caller that blocks longer closes the writer first and opens a
    new one afterwards, which resumes from the committed offsets."""

    def __init__(self, settings: Settings, store: ReadingStore, group_id: str = "fabwatch-trainer-store",
                 flush_rows: int = 50_000, flush_interval_s: float = 30.0, stats: StoreStats | None = None):
        """``stats``: counters to carry on from an earlier writer of the same store."""
        self.settings = settings
        self.store = store
        self.decoder = ReadingDecoder(store.feature_names, settings.max_message_bytes, settings.event_time_bounds())
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.stats = stats if stats is not None else StoreStats()
        self.consumer = Consumer(settings.client_config(**{
            "group.id": group_id, "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "isolation.level": "read_committed"}))
        self.consumer.subscribe([settings.topics.sensors])
        self._reset_buffer()

    def _reset_buffer(self) -> None:
        self._entity: list[str] = []
        self._ts: list[int] = []
        self._values: list[np.ndarray] = []
        self._label: list[int] = []
        self._since = time.monotonic()

    def poll_once(self, timeout: float = 1.0) -> int:
        """Consume what is available; flush when the buffer is full or old enough. Returns rows buffered."""
        for msg in self.consumer.consume(10_000, timeout=timeout):
            if not has_data(msg, log):
                continue
            try:
                reading, vec = self.decoder.decode(msg.value(), broker_ms=msg.timestamp()[1])
            except Rejected:  # the decoder raises nothing else: no message can stop the writer
                self.stats.skipped_invalid += 1  # the processor dead-letters these
                continue
            self._entity.append(reading.entity)
            self._ts.append(reading.ts)
            self._values.append(vec)
            self._label.append(-1 if reading.label is None else reading.label)
        if len(self._ts) >= self.flush_rows or (self._ts and time.monotonic() - self._since >= self.flush_interval_s):
            self.flush()
        return len(self._ts)

    def assigned(self) -> bool:
        """Whether the consumer group has given this writer partitions yet."""
        return bool(self.consumer.assignment())

    def flush(self) -> None:
        """Write the buffer durably, then commit the consumer's positions."""
        if self._ts:
            files = self.store.write(self._entity, np.asarray(self._ts, np.int64), np.vstack(self._values),
                                     np.asarray(self._label, np.int8))
            self.stats.rows_written += len(self._ts)
            self.stats.files_written += len(files)
        try:
            self.consumer.commit(asynchronous=False)
        except Exception as exc:  # nothing consumed yet: no offsets to commit
            if "NO_OFFSET" not in str(exc):
                raise
        self._reset_buffer()

    def close(self) -> None:
        """Flush and commit, then leave the group (without auto-commit, close commits nothing itself)."""
        self.flush()
        self.consumer.close()
