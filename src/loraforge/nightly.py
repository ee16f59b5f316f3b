"""The optional schedule inside the server: nightly updates from an inbox folder.

`loraforge serve --schedule schedule.yaml`:

    - adapter: foundation
      at: "02:00"              # local time, daily
      inbox: foundation-inbox  # a folder inside $LORAFORGE_HOME/data
      replay_ratio: 6          # any update option: min_efficacy, tolerance, num_epochs, learning_rate, keep
      num_epochs: 25
      learning_rate: 0.0005

Once a day, at or after `at`, every data file in the inbox (`*.jsonl`, `*.json`) that was not queued
before is queued as one update job each, oldest name first; a suite file with the same stem
(`day4.jsonl` + `day4.yaml`) gates it. A file is remembered by name and sha256, so an edited file is
picked up again. Outside the server, cron or a systemd timer running `loraforge update` does the same.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, time as clock_time, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraforge import paths
from loraforge.continuous import UpdateOptions, queue_update
from loraforge.data import load_examples_from_file
from loraforge.errors import ConfigError, LoraforgeError
from loraforge.evals.gate import GatePolicy
from loraforge.evals.suite import load_suite
from loraforge.structured import read_structured
from loraforge.names import check_name

log = logging.getLogger("loraforge.nightly")

SCHEMA = """
CREATE TABLE IF NOT EXISTS nightly_inbox (
    adapter TEXT NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    job_id TEXT,
    error TEXT,
    queued_at TEXT NOT NULL,
    PRIMARY KEY (adapter, file, sha256)
);
"""


class NightlyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str
    at: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="HH:MM, local time")
    inbox: str
    replay_ratio: float = Field(default=1.0, ge=0)
    min_efficacy: float = Field(default=0.9, ge=0, le=1)
    tolerance: float = Field(default=0.05, ge=0, le=1)
    num_epochs: float | None = Field(default=None, gt=0)
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    keep: int | None = Field(default=None, ge=1)

    @field_validator("adapter")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "adapter")

    def options(self) -> UpdateOptions:
        return UpdateOptions(replay_ratio=self.replay_ratio, keep=self.keep, num_epochs=self.num_epochs,
                             learning_rate=self.learning_rate,
                             policy=GatePolicy(min_efficacy=self.min_efficacy, tolerance=self.tolerance))

    def start(self) -> clock_time:
        hours, minutes = self.at.split(":")
        return clock_time(int(hours), int(minutes))


def load_schedule(path: Path) -> list[NightlyEntry]:
    raw = read_structured(Path(path))
    if not isinstance(raw, list):
        raise ConfigError(f"{Path(path).name}: a schedule is a list of entries", field="schedule")
    entries = []
    for index, item in enumerate(raw):
        try:
            entries.append(NightlyEntry.model_validate(item))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{Path(path).name}: entry {index + 1}: {where}: "
                              f"{err['msg'].removeprefix('Value error, ')}", field=f"schedule[{index}]") from None
        except LoraforgeError as exc:
            raise ConfigError(f"{Path(path).name}: entry {index + 1}: {exc.message}", field=f"schedule[{index}]") from None
    return entries


class Nightly:
    """Checked by the server's scheduler thread; queues due inbox files as update jobs."""

    def __init__(self, queue, entries: list[NightlyEntry], device: str):
        self.queue = queue
        self.entries = entries
        self.device = device
        self.last_day: dict[str, str] = {}
        with queue.store.reading() as db:
            db.executescript(SCHEMA)

    def due(self, entry: NightlyEntry, now: datetime) -> bool:
        return now.time() >= entry.start() and self.last_day.get(entry.adapter) != now.date().isoformat()

    def tick(self, now: datetime | None = None) -> list[str]:
        now = now or datetime.now()
        queued: list[str] = []
        for entry in self.entries:
            if not self.due(entry, now):
                continue
            self.last_day[entry.adapter] = now.date().isoformat()
            queued += self._queue_inbox(entry)
        return queued

    def _queue_inbox(self, entry: NightlyEntry) -> list[str]:
        store = self.queue.store
        inbox = paths.inside(store.root / "data", entry.inbox)
        if not inbox.is_dir():
            log.warning("nightly %s: inbox %s does not exist", entry.adapter, entry.inbox)
            return []
        queued = []
        for data in sorted(p for p in inbox.iterdir() if p.suffix in (".jsonl", ".json") and p.is_file()):
            digest = hashlib.sha256(data.read_bytes()).hexdigest()
            with store.reading() as db:
                seen = db.execute("SELECT 1 FROM nightly_inbox WHERE adapter = ? AND file = ? AND sha256 = ?",
                                  (entry.adapter, data.name, digest)).fetchone()
            if seen:
                continue
            job_id, error = None, None
            try:
                suite_file = next((data.with_suffix(s) for s in (".yaml", ".yml") if data.with_suffix(s).is_file()),
                                  None)
                suite = load_suite(suite_file) if suite_file else None
                job_id = queue_update(self.queue, entry.adapter, load_examples_from_file(data), suite,
                                      entry.options(), self.device).id
                queued.append(job_id)
            except LoraforgeError as exc:  # recorded, so a broken file is reported once, not every night
                error = exc.message
                log.warning("nightly %s: %s not queued: %s", entry.adapter, data.name, error)
            with store.transaction() as db:
                db.execute("INSERT INTO nightly_inbox(adapter, file, sha256, job_id, error, queued_at) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (entry.adapter, data.name, digest, job_id, error,
                                                         datetime.now(timezone.utc).isoformat(timespec="seconds")))
        return queued
