"""Raw HDFS log lines -> structured rows ``(line id, block id, event id)``: the log keys DeepLog reads.

Serving side (no TensorFlow). Two ways to name events:

- a template file in loghub's ``HDFS_templates.csv`` format (``EventId,EventTemplate``, ``<*>`` marks a
  variable part): each line's content takes the id of the matching template; when several match,
  the most specific one (most literal characters) wins, so ``Received block .. src .. dest .. of size``
  is not swallowed by a shorter pattern;
- no template file: the Drain algorithm (He et al., ICWS 2017) from the ``drain3`` library, with block
  ids, IP addresses and numbers masked first so that variable parts never split a template.

A line names its block(s) with ``blk_<id>``; a line naming several blocks yields one row per block,
as DeepLog's session grouping does (the block is the session).
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

from fabwatch.export.errors import UsageError

# ``081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38 terminating``
HDFS_LINE = re.compile(r"^(?P<date>\d{6}) (?P<time>\d{6}) (?P<pid>\d+) (?P<level>\w+) (?P<component>[^:]+): (?P<content>.*)$")
BLOCK_ID = re.compile(r"blk_-?\d+")
UNMATCHED = "unmatched"


@dataclass(frozen=True)
class LogRow:
    """One event of one session: ``line_id`` counts raw lines from 1, like loghub's ``LineId``; ``ts`` is
    the header's time in epoch ms (HDFS headers carry no zone: read as UTC)."""

    line_id: int
    block_id: str
    event_id: str
    ts: int


@lru_cache(maxsize=4096)
def hdfs_ts_ms(date: str, clock: str) -> int:
    """``081109``, ``203615`` -> epoch ms (UTC); cached because consecutive lines share their second."""
    return int(datetime.strptime(date + clock, "%y%m%d%H%M%S").replace(tzinfo=timezone.utc).timestamp() * 1000)


class TemplateMatcher:
    """Event ids from a template file; matching is a full-line regex per template, most specific first."""

    def __init__(self, templates: Sequence[tuple[str, str]]):
        if not templates:
            raise UsageError("the template file has no templates")
        self.templates = dict(templates)
        scored = []
        for event_id, template in templates:
            parts = template.split("<*>")
            literals = [part.strip() for part in parts]
            # variable parts match anything; whitespace inside a literal matches any whitespace run
            pattern = r".*?".join(r"\s+".join(map(re.escape, part.split())) for part in parts)
            anchor = max((token for part in parts for token in part.split()), key=len, default="")
            scored.append((sum(map(len, literals)), event_id, re.compile(rf"^\s*{pattern}\s*$", re.DOTALL), anchor))
        scored.sort(key=lambda t: -t[0])
        self._templates = [(event_id, regex, anchor) for _, event_id, regex, anchor in scored]

    @classmethod
    def from_csv(cls, path: Path) -> "TemplateMatcher":
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"EventId", "EventTemplate"} <= set(reader.fieldnames):
                    raise UsageError(f"{path}: expected the columns EventId,EventTemplate")
                return cls([(r["EventId"], r["EventTemplate"]) for r in reader])
        except FileNotFoundError:
            raise UsageError(f"template file {path} not found") from None

    def event_id(self, content: str) -> str:
        for event_id, regex, anchor in self._templates:
            if anchor in content and regex.match(content):
                return event_id
        return UNMATCHED


class DrainMatcher:
    """Drain template mining (drain3) with HDFS-friendly masks; event ids are ``D<cluster id>``.

    Clusters are mined online in one pass; a line keeps the cluster it joined (its id is stable even
    when the cluster's template generalises later).
    """

    MASKS = (
        (r"blk_-?\d+(?:\s+blk_-?\d+)*", "BLK"),  # a list of blocks is one variable part
        (r"/?\d+\.\d+\.\d+\.\d+(:\d+)?", "IP"),
        (r"(?<![A-Za-z])-?\d+(?![A-Za-z])", "NUM"),
    )

    def __init__(self, sim_th: float = 0.5, depth: int = 4):
        from drain3 import TemplateMiner
        from drain3.masking import MaskingInstruction
        from drain3.template_miner_config import TemplateMinerConfig

        config = TemplateMinerConfig()
        config.drain_sim_th = sim_th
        config.drain_depth = depth
        config.profiling_enabled = False
        config.masking_instructions = [MaskingInstruction(p, name) for p, name in self.MASKS]
        self._miner = TemplateMiner(config=config)

    def event_id(self, content: str) -> str:
        return f"D{self._miner.add_log_message(content)['cluster_id']}"

    @property
    def templates(self) -> dict[str, str]:
        return {f"D{c.cluster_id}": c.get_template() for c in self._miner.drain.clusters}


def parse_lines(lines: Iterable[str], matcher: TemplateMatcher | DrainMatcher) -> Iterator[LogRow]:
    """Rows for every line that names a block; lines without a parsable header or a block are skipped."""
    for line_id, line in enumerate(lines, start=1):
        match = HDFS_LINE.match(line.rstrip("\r\n"))
        if match is None:
            continue
        content = match.group("content")
        blocks = dict.fromkeys(BLOCK_ID.findall(content))
        if not blocks:
            continue
        try:
            ts = hdfs_ts_ms(match.group("date"), match.group("time"))
        except ValueError:  # six digits that are no date: not an HDFS header after all
            continue
        event_id = matcher.event_id(content)
        for block in blocks:
            yield LogRow(line_id, block, event_id, ts)


def parse_file(path: Path, templates: Path | None = None) -> tuple[list[LogRow], dict[str, str]]:
    """Parse a raw HDFS log; returns the rows and the event templates used (id -> template)."""
    matcher = TemplateMatcher.from_csv(templates) if templates is not None else DrainMatcher()
    try:
        with open(path, errors="replace") as f:
            rows = list(parse_lines(f, matcher))
    except FileNotFoundError:
        raise UsageError(f"log file {path} not found") from None
    return rows, matcher.templates


def write_rows(rows: Iterable[LogRow], out: IO[str]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["LineId", "BlockId", "EventId"])
    for row in rows:
        writer.writerow([row.line_id, row.block_id, row.event_id])


def grouping_agreement(predicted: dict[int, str], truth: dict[int, str]) -> dict[str, float | int]:
    """How far two event labellings of the same lines agree, whatever each one's numbering.

    ``mapped``: share of lines whose predicted id maps to their true id under the best one-to-one
    mapping by majority (the ids of a template file and of a structured file differ in numbering).
    ``grouping_accuracy``: loghub's stricter measure: a line counts when the set of lines sharing its
    predicted id is exactly the set sharing its true id.
    """
    lines = sorted(set(predicted) & set(truth))
    if not lines:
        raise UsageError("no line ids in common between the parsed rows and the reference")
    pairs = Counter((predicted[i], truth[i]) for i in lines)
    mapping: dict[str, str] = {}
    taken: set[str] = set()
    for (p, t), _ in pairs.most_common():
        if p not in mapping and t not in taken:
            mapping[p] = t
            taken.add(t)
    mapped = sum(mapping.get(predicted[i]) == truth[i] for i in lines)

    def groups(labels: dict[int, str]) -> dict[str, frozenset[int]]:
        out: dict[str, set[int]] = {}
        for i in lines:
            out.setdefault(labels[i], set()).add(i)
        return {k: frozenset(v) for k, v in out.items()}

    pg, tg = groups(predicted), groups(truth)
    grouped = sum(pg[predicted[i]] == tg[truth[i]] for i in lines)
    return {"lines": len(lines), "mapped": mapped / len(lines), "grouping_accuracy": grouped / len(lines),
            "predicted_events": len(pg), "reference_events": len(tg)}


def read_structured(path: Path) -> dict[int, str]:
    """``LineId -> EventId`` from a loghub ``*_structured.csv``."""
    try:
        with open(path, newline="") as f:
            return {int(r["LineId"]): r["EventId"] for r in csv.DictReader(f)}
    except (FileNotFoundError, KeyError) as exc:
        raise UsageError(f"{path}: not a loghub structured CSV ({exc})") from None
