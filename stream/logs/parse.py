"""Raw HDFS log lines -> structured rows ``(line id, block id, event id)``: the log keys DeepLog reads.

Serving side (no TensorFlow). Two ways to name events:

- a template file in loghub's ``HDFS_templates.csv`` format (``EventId,EventTemplate``, ``<*>`` marks a
  variable part): each line's content takes the id of the matching template; when several match,
  the most specific one (most literal characters) wins, so ``Received block .. src .. dest .. of size``
  is not swallowed by a shorter pattern;
- no template file: the Drain algorithm (He et al., ICWS 2017) from the ``drain3`` library, with block
  ids, IP addresses and numbers masked first so that variable parts never split a template. Drain
  numbers its clusters in the order it meets them, so those numbers are not keys: the templates are
  mined from the whole file first, each is named by a hash of its final text (``D`` + 12 hex digits),
  and every line is then matched against them. Swapping lines changes no key. The learned templates
  (a ``DrainState``, JSON) are stored with the DeepLog model in its registry version; replay and
  ``logs parse --registry`` match lines against them and never learn: a line that no learned template
  matches gets the key ``unmatched``, which the model reads as unknown (an ``unknown_key`` alert).

A line names its block(s) with ``blk_<id>``; a line naming several blocks yields one row per block,
as DeepLog's session grouping does (the block is the session).
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterable, Iterator, Literal, Sequence

from pydantic import BaseModel, Field

from fabwatch.export.errors import UsageError, read_json_model

if TYPE_CHECKING:
    from drain3 import TemplateMiner

# ``081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38 terminating``
HDFS_LINE = re.compile(r"^(?P<date>\d{6}) (?P<time>\d{6}) (?P<pid>\d+) (?P<level>\w+) (?P<component>[^:]+): (?P<content>.*)$")
BLOCK_ID = re.compile(r"blk_-?\d+")
UNMATCHED = "unmatched"
DRAIN_STATE = "drain_state.json"  # the learned templates, in a logkeys registry version


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


class DrainState(BaseModel):
    """Learned Drain templates (key -> template) and the masks and tree depth they were mined with: what
    the keys of a logkeys model mean. Plain JSON on purpose: drain3's own snapshots are jsonpickle,
    which can build any Python object from the file."""

    format: Literal["fabwatch-drain/1"] = "fabwatch-drain/1"
    depth: int = Field(ge=3)
    masks: list[tuple[str, str]] = Field(description="(regex, mask name), applied in order before matching")
    templates: dict[str, str] = Field(description="key -> template; tokens are words, masks or <*>")

    @classmethod
    def read(cls, path: Path) -> "DrainState":
        return read_json_model(cls, path, "Drain state")

    @classmethod
    def from_registry(cls, registry: Path, version: str | None = None) -> "DrainState":
        """The state stored with a logkeys model (default: the current one), refused unless the bytes
        read are the ones the manifest lists (``Registry.resolve`` has re-hashed every file already)."""
        from fabwatch.export.registry import Registry, RegistryError

        vdir, manifest = Registry(registry).resolve(version)
        if manifest.task != "logkeys":
            raise UsageError(f"registry {registry} version {manifest.version} is a {manifest.task!r} model, not logkeys")
        if DRAIN_STATE not in manifest.files:
            raise UsageError(f"{manifest.version} has no Drain state (trained on keys from a template file or "
                             f"another parser): parse with --templates")
        raw = (vdir / DRAIN_STATE).read_bytes()
        if hashlib.sha256(raw).hexdigest() != manifest.files[DRAIN_STATE]:
            raise RegistryError(f"{manifest.version}: {DRAIN_STATE} changed after its sha256 check: not used")
        return cls.model_validate_json(raw)

    def write(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")


def _miner(masks: Sequence[tuple[str, str]], depth: int, sim_th: float = 0.5) -> "TemplateMiner":
    from drain3 import TemplateMiner
    from drain3.masking import MaskingInstruction
    from drain3.template_miner_config import TemplateMinerConfig

    config = TemplateMinerConfig()
    config.drain_sim_th = sim_th
    config.drain_depth = depth
    config.profiling_enabled = False
    config.masking_instructions = [MaskingInstruction(pattern, name) for pattern, name in masks]
    return TemplateMiner(config=config)


def template_key(template: str) -> str:
    """A key named by the template's text, not by when Drain met it: the same in every file that
    yields the template, whatever the order of its lines."""
    return "D" + hashlib.sha256(template.encode()).hexdigest()[:12]


def learn_drain(contents: Iterable[str], sim_th: float = 0.5, depth: int = 4) -> DrainState:
    """Mine Drain templates from every line's content, with HDFS-friendly masks."""
    miner = _miner(DrainMatcher.MASKS, depth, sim_th)
    for content in contents:
        miner.add_log_message(content)
    templates = {c.get_template() for c in miner.drain.clusters}
    return DrainState(depth=depth, masks=list(DrainMatcher.MASKS), templates={template_key(t): t for t in templates})


class DrainMatcher:
    """Keys from learned Drain templates; matching never learns: a line that no template matches token
    for token (``<*>`` matching any token) is ``UNMATCHED``.

    The miner is rebuilt from the state, templates inserted in key order, so the prefix tree and the
    match of a line do not depend on the order of the lines the templates were learned from.
    """

    MASKS = (
        (r"blk_-?\d+(?:\s+blk_-?\d+)*", "BLK"),  # a list of blocks is one variable part
        (r"/?\d+\.\d+\.\d+\.\d+(:\d+)?", "IP"),
        (r"(?<![A-Za-z])-?\d+(?![A-Za-z])", "NUM"),
    )

    def __init__(self, state: DrainState):
        from drain3.drain import LogCluster

        self.state = state
        self._miner = _miner(state.masks, state.depth)
        drain = self._miner.drain
        self._keys: dict[int, str] = {}
        for cluster_id, key in enumerate(sorted(state.templates), start=1):
            cluster = LogCluster(drain.get_content_as_tokens(state.templates[key]), cluster_id)
            drain.id_to_cluster[cluster_id] = cluster
            drain.add_seq_to_prefix_tree(drain.root_node, cluster)
            self._keys[cluster_id] = key

    def event_id(self, content: str) -> str:
        cluster = self._miner.match(content, full_search_strategy="fallback")
        return UNMATCHED if cluster is None else self._keys[cluster.cluster_id]

    @property
    def templates(self) -> dict[str, str]:
        return self.state.templates


def hdfs_lines(lines: Iterable[str]) -> Iterator[tuple[int, str, list[str], int]]:
    """``(line id, content, blocks, ts)`` of every line that names a block; lines without a parsable
    header or a block are skipped."""
    for line_id, line in enumerate(lines, start=1):
        match = HDFS_LINE.match(line.rstrip("\r\n"))
        if match is None:
            continue
        content = match.group("content")
        blocks = list(dict.fromkeys(BLOCK_ID.findall(content)))
        if not blocks:
            continue
        try:
            ts = hdfs_ts_ms(match.group("date"), match.group("time"))
        except ValueError:  # six digits that are no date: not an HDFS header after all
            continue
        yield line_id, content, blocks, ts


def parse_lines(lines: Iterable[str], matcher: TemplateMatcher | DrainMatcher) -> Iterator[LogRow]:
    """One row per block named by each HDFS line, keyed by ``matcher``."""
    for line_id, content, blocks, ts in hdfs_lines(lines):
        event_id = matcher.event_id(content)
        for block in blocks:
            yield LogRow(line_id, block, event_id, ts)


def parse_file(path: Path, templates: Path | None = None,
               drain: DrainState | None = None) -> tuple[list[LogRow], TemplateMatcher | DrainMatcher]:
    """Parse a raw HDFS log; returns the rows and the matcher that keyed them (its ``templates``:
    key -> template). Keys come from the template file, else from ``drain`` (a model's learned
    templates), else from Drain templates learned on this file first (a pass of its own)."""
    matcher = make_matcher(path, templates, drain)
    try:
        with open(path, errors="replace") as f:
            rows = list(parse_lines(f, matcher))
    except FileNotFoundError:
        raise UsageError(f"log file {path} not found") from None
    return rows, matcher


def make_matcher(path: Path, templates: Path | None = None,
                 drain: DrainState | None = None) -> TemplateMatcher | DrainMatcher:
    """The matcher ``parse_file`` keys ``path`` with (see there)."""
    if templates is not None and drain is not None:
        raise UsageError("a template file and a Drain state exclude each other")
    try:
        if templates is not None:
            return TemplateMatcher.from_csv(templates)
        if drain is None:
            with open(path, errors="replace") as f:
                drain = learn_drain(content for _, content, _, _ in hdfs_lines(f))
        return DrainMatcher(drain)
    except FileNotFoundError:
        raise UsageError(f"log file {path} not found") from None


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
