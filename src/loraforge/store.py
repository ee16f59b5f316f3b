"""The adapter store: one root, SQLite for records, immutable version folders for files.

Layout under `$LORAFORGE_HOME`:
    store.db                     SQLite (WAL, synchronous=FULL, foreign keys on)
    adapters/NAME/vN/            a PEFT folder + loraforge.json + metrics.jsonl + data.jsonl
    runs/RUN/                    checkpoints and the metrics log of a run in progress
    tmp/                         folders being written; renamed into place only when complete

A version folder appears only complete (temp folder + fsync + rename inside the same transaction
that records it) and is checked against the sha256 of its files whenever it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from loraforge import paths
from loraforge.errors import Conflict, IntegrityError, LoraforgeError, NotFound
from loraforge.names import AdapterRef, check_name, parse_ref

SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    active_version INTEGER
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES adapters(name) ON DELETE CASCADE,
    version INTEGER NOT NULL CHECK (version >= 1),
    status TEXT NOT NULL CHECK (status IN ('candidate', 'active', 'archived', 'rejected')),
    base_model TEXT NOT NULL,
    base_fingerprint TEXT,
    config_json TEXT NOT NULL,
    data_hash TEXT,
    metrics_json TEXT NOT NULL DEFAULT '{}',
    size_json TEXT NOT NULL DEFAULT '{}',
    files_json TEXT NOT NULL,
    parent INTEGER,
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS evals (
    id TEXT PRIMARY KEY,
    name TEXT,
    version INTEGER,
    model TEXT NOT NULL,
    suite TEXT NOT NULL,
    suite_digest TEXT NOT NULL,
    scores_json TEXT NOT NULL,
    base_scores_json TEXT,
    created_at TEXT NOT NULL,
    FOREIGN KEY (name, version) REFERENCES versions(name, version) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS evals_by_version ON evals(name, version);
CREATE TABLE IF NOT EXISTS decisions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('promote', 'reject')),
    reasons_json TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version),
    FOREIGN KEY (name, version) REFERENCES versions(name, version) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS status_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL REFERENCES adapters(name) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);
"""
STATUSES = ("candidate", "active", "archived", "rejected")


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    status: str
    base_model: str
    base_fingerprint: str | None
    config: dict
    data_hash: str | None
    metrics: dict
    size: dict
    files: dict[str, str]
    parent: int | None
    created_at: str
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    def public(self) -> dict:
        """What the API and CLI show: no absolute paths."""
        return {"name": self.name, "version": self.version, "ref": self.ref, "status": self.status,
                "base_model": self.base_model, "base_fingerprint": self.base_fingerprint,
                "config": self.config, "data_hash": self.data_hash, "metrics": self.metrics,
                "size": self.size, "parent": self.parent, "created_at": self.created_at,
                "files": self.files}


def sha256_files(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        out[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return out


def _eval_filter(name: str, version: int | None) -> tuple[str, tuple]:
    """The WHERE clause (placeholders only) and its values for an adapter's evals, or one version's."""
    return ("name = ?", (name,)) if version is None else ("name = ? AND version = ?", (name, version))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Store:
    def __init__(self, root: Path | None = None):
        self.root = (root or paths.home()).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("adapters", "runs", "tmp", "data", "evals", "snapshots", "suites"):
            (self.root / sub).mkdir(exist_ok=True)
        with self.reading() as db:
            db.executescript(SCHEMA)

    # ---- database --------------------------------------------------------------------------------------
    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "store.db", timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    @contextmanager
    def reading(self):
        db = self.connect()
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE: one writer at a time, serialised by SQLite itself (across processes)."""
        db = self.connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # ---- paths ------------------------------------------------------------------------------------------
    def adapter_dir(self, name: str) -> Path:
        return paths.inside(self.root / "adapters", check_name(name, "adapter"))

    def version_dir(self, name: str, version: int) -> Path:
        return paths.inside(self.adapter_dir(name), f"v{int(version)}")

    def new_tmp_dir(self) -> Path:
        return self.root / "tmp" / f"{int(time.time())}-{uuid.uuid4().hex}"

    def run_dir(self, run_id: str) -> Path:
        return paths.inside(self.root / "runs", check_name(run_id, "run"))

    # ---- versions ---------------------------------------------------------------------------------------
    def publish(self, name: str, staged: Path, *, base_model: str, base_fingerprint: str | None, config: dict,
                data_hash: str | None, metrics: dict, size: dict, status: str = "active",
                parent: int | None = None) -> AdapterVersion:
        """Move a complete folder into the store as the next version of `name`, atomically."""
        check_name(name, "adapter")
        if status not in STATUSES:
            raise ValueError(status)
        files = sha256_files(staged)
        paths.fsync_tree(staged)
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO adapters(name, created_at) VALUES (?, ?)", (name, _now()))
            row = db.execute("SELECT COALESCE(MAX(version), 0) + 1 AS v FROM versions WHERE name = ?",
                             (name,)).fetchone()
            version = int(row["v"])
            active = db.execute("SELECT active_version FROM adapters WHERE name = ?", (name,)).fetchone()[0]
            if parent is None:
                parent = active
            final = self.version_dir(name, version)
            if final.exists():  # left by a crash between rename and commit: not recorded, so not valid
                paths.remove_tree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            staged.rename(final)
            try:
                db.execute(
                    "INSERT INTO versions(name, version, status, base_model, base_fingerprint, config_json, "
                    "data_hash, metrics_json, size_json, files_json, parent, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, version, status, base_model, base_fingerprint, json.dumps(config), data_hash,
                     json.dumps(metrics), json.dumps(size), json.dumps(files), parent, _now()))
                self._log(db, name, version, "publish", status)
                if status == "active":
                    db.execute("UPDATE versions SET status = 'archived' WHERE name = ? AND status = 'active' "
                               "AND version != ?", (name, version))
                    db.execute("UPDATE adapters SET active_version = ? WHERE name = ?", (version, name))
            except BaseException:
                final.rename(staged)
                raise
            paths.fsync_dir(final.parent)
        return self.get(AdapterRef(name, version))

    def sweep(self) -> list[str]:
        """Remove version folders no record names (a crash between a publish's rename and its commit), and
        adapter folders left empty; the paths removed, relative to the store. Holds the write lock, so a publish
        in another process (its rename and commit are one transaction) is never mistaken for debris."""
        removed = []
        adapters = self.root / "adapters"
        if not adapters.is_dir():
            return removed
        with self.transaction() as db:
            recorded = {(r["name"], int(r["version"])) for r in db.execute("SELECT name, version FROM versions")}
            names = {r["name"] for r in db.execute("SELECT name FROM adapters")}
            for folder in sorted(p for p in adapters.iterdir() if p.is_dir() and not p.is_symlink()):
                for child in sorted(folder.iterdir()):
                    number = child.name[1:]
                    if (child.is_dir() and child.name.startswith("v") and number.isdigit()
                            and (folder.name, int(number)) not in recorded):
                        paths.remove_tree(child)
                        removed.append(child.relative_to(self.root).as_posix())
                if folder.name not in names and not any(folder.iterdir()):
                    folder.rmdir()
                    removed.append(folder.relative_to(self.root).as_posix())
        return removed

    # ---- lifecycle: promotion, rejection, rollback, retention ------------------------------------------
    def activate(self, name: str, version: int, *, action: str = "promote", detail: str = "") -> AdapterVersion:
        """Make `version` the active one in one transaction (the previous active becomes archived).

        Serving resolves NAME to a version per request, so requests in flight finish on the version they
        started with and the next request gets this one.
        """
        with self.transaction() as db:
            row = db.execute("SELECT status FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone()
            if row is None:
                raise NotFound(f"adapter '{name}@v{version}' not found", field="version")
            if row["status"] == "rejected" and action != "force":
                raise Conflict(f"{name}@v{version} was rejected by the gate; it cannot become active",
                               field="version")
            db.execute("UPDATE versions SET status = 'archived' WHERE name = ? AND status = 'active'", (name,))
            db.execute("UPDATE versions SET status = 'active' WHERE name = ? AND version = ?", (name, version))
            db.execute("UPDATE adapters SET active_version = ? WHERE name = ?", (version, name))
            self._log(db, name, version, action, detail)
        return self.get(AdapterRef(name, version))

    def reject(self, name: str, version: int, reasons: list[str]) -> None:
        with self.transaction() as db:
            db.execute("UPDATE versions SET status = 'rejected' WHERE name = ? AND version = ?", (name, version))
            self._log(db, name, version, "reject", "; ".join(reasons))

    def rollback(self, name: str, to: int | None = None) -> AdapterVersion:
        """Activate `to`, or else the active version's parent (the version it was trained from)."""
        current = self.get(AdapterRef(name, None))
        target = to if to is not None else current.parent
        if target is None:
            raise Conflict(f"{current.ref} has no parent to roll back to; name a version with --to", field="to")
        if target == current.version:
            raise Conflict(f"{current.ref} is already active", field="to")
        return self.activate(name, target, action="rollback", detail=f"from v{current.version}")

    def record_decision(self, name: str, version: int, decision: dict, detail: dict) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO decisions(name, version, decision, reasons_json, detail_json, "
                       "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                       (name, version, decision["decision"], json.dumps(decision["reasons"]), json.dumps(detail),
                        _now()))

    def decisions(self, name: str) -> dict[int, dict]:
        with self.reading() as db:
            rows = db.execute("SELECT * FROM decisions WHERE name = ?", (name,)).fetchall()
        return {r["version"]: {"decision": r["decision"], "reasons": json.loads(r["reasons_json"]),
                               **json.loads(r["detail_json"]), "at": r["created_at"]} for r in rows}

    def status_log(self, name: str) -> list[dict]:
        with self.reading() as db:
            rows = db.execute("SELECT * FROM status_log WHERE name = ? ORDER BY id", (name,)).fetchall()
        return [{"version": r["version"], "action": r["action"], "detail": r["detail"], "at": r["created_at"]}
                for r in rows]

    def lineage(self, version: AdapterVersion) -> list[AdapterVersion]:
        """The version and its ancestors, newest first."""
        chain, seen = [version], {version.version}
        while chain[-1].parent is not None and chain[-1].parent not in seen:
            parent = self.get(AdapterRef(version.name, chain[-1].parent))
            chain.append(parent)
            seen.add(parent.version)
        return chain

    def prune(self, name: str, keep: int) -> list[int]:
        """Delete all but the newest `keep` versions; never the active version or its parent."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        versions = self.versions(name)
        active = next((v for v in versions if v.status == "active"), None)
        protected = {v.version for v in versions[-keep:]}
        if active is not None:
            protected |= {active.version} | ({active.parent} if active.parent else set())
        doomed = [v.version for v in versions if v.version not in protected]
        for number in doomed:
            folder = self.version_dir(name, number)
            trash = self.new_tmp_dir()
            with self.transaction() as db:
                reports = self._eval_ids(db, name, number)
                db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, number))
                self._log(db, name, number, "prune", f"kept the newest {keep}")
                if folder.exists():
                    folder.rename(trash)
            paths.remove_tree(trash)
            self._remove_eval_reports(reports)
        return doomed

    @staticmethod
    def _log(db, name: str, version: int, action: str, detail: str) -> None:
        db.execute("INSERT INTO status_log(name, version, action, detail, created_at) VALUES (?, ?, ?, ?, ?)",
                   (name, version, action, detail, _now()))

    # ---- evaluation results -----------------------------------------------------------------------------
    def record_eval(self, report: dict, *, name: str | None, version: int | None) -> str:
        """Keep an eval report (full JSON under evals/) with the adapter version it tested; returns its id."""
        eval_id = f"{int(time.time())}-{uuid.uuid4().hex[:8]}"
        paths.atomic_write_json(self.root / "evals" / f"{eval_id}.json", report)
        with self.transaction() as db:
            db.execute("INSERT INTO evals(id, name, version, model, suite, suite_digest, scores_json, "
                       "base_scores_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (eval_id, name, version, report["model"], report["suite"], report["suite_digest"],
                        json.dumps({"scores": report["scores"], "tags": report["tags"]}),
                        json.dumps({"scores": report["base"]["scores"], "tags": report["base"]["tags"]})
                        if report.get("base") else None, _now()))
        return eval_id

    def evals(self, name: str, version: int | None = None) -> list[dict]:
        """Eval summaries of an adapter (or one version), newest first."""
        where, args = _eval_filter(name, version)
        with self.reading() as db:
            rows = db.execute(f"SELECT * FROM evals WHERE {where} ORDER BY created_at DESC, id DESC", args).fetchall()
        out = []
        for row in rows:
            scores = json.loads(row["scores_json"])
            base = json.loads(row["base_scores_json"]) if row["base_scores_json"] else None
            out.append({"id": row["id"], "ref": f"{row['name']}@v{row['version']}", "suite": row["suite"],
                        "suite_digest": row["suite_digest"], "scores": scores["scores"], "tags": scores["tags"],
                        "base_scores": base["scores"] if base else None, "created_at": row["created_at"]})
        return out

    @staticmethod
    def _eval_ids(db, name: str, version: int | None = None) -> list[str]:
        """Ids of the eval reports of an adapter (or one version) about to be deleted: their rows cascade."""
        where, args = _eval_filter(name, version)
        return [row["id"] for row in db.execute(f"SELECT id FROM evals WHERE {where}", args)]

    def _remove_eval_reports(self, eval_ids: list[str]) -> None:
        """Remove the JSON of deleted versions' eval reports, after their rows are gone."""
        for eval_id in eval_ids:
            (self.root / "evals" / f"{eval_id}.json").unlink(missing_ok=True)

    def eval_report(self, eval_id: str) -> dict:
        check_name(eval_id, "eval id")
        path = paths.inside(self.root / "evals", f"{eval_id}.json")
        if not path.is_file():
            raise NotFound(f"eval {eval_id!r} not found", field="eval")
        return json.loads(path.read_text(encoding="utf-8"))

    def _row_to_version(self, row: sqlite3.Row) -> AdapterVersion:
        return AdapterVersion(
            row["name"], row["version"], row["status"], row["base_model"], row["base_fingerprint"],
            json.loads(row["config_json"]), row["data_hash"], json.loads(row["metrics_json"]),
            json.loads(row["size_json"]), json.loads(row["files_json"]), row["parent"], row["created_at"],
            self.version_dir(row["name"], row["version"]))

    def get(self, ref: AdapterRef | str) -> AdapterVersion:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self.reading() as db:
            if ref.version is None:
                row = db.execute("SELECT v.* FROM versions v JOIN adapters a ON a.name = v.name "
                                 "AND a.active_version = v.version WHERE v.name = ?", (ref.name,)).fetchone()
            else:
                row = db.execute("SELECT * FROM versions WHERE name = ? AND version = ?",
                                 (ref.name, ref.version)).fetchone()
        if row is None:
            what = "has no active version" if ref.version is None and self.exists(ref.name) else "not found"
            raise NotFound(f"adapter {str(ref)!r} {what}", field="adapter")
        return self._row_to_version(row)

    def exists(self, name: str) -> bool:
        with self.reading() as db:
            return db.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone() is not None

    def versions(self, name: str) -> list[AdapterVersion]:
        with self.reading() as db:
            rows = db.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()
        return [self._row_to_version(r) for r in rows]

    def list(self) -> list[dict]:
        with self.reading() as db:
            rows = db.execute("SELECT a.name, a.active_version, COUNT(v.version) AS versions, a.created_at "
                              "FROM adapters a LEFT JOIN versions v ON v.name = a.name GROUP BY a.name "
                              "ORDER BY a.name").fetchall()
        return [dict(r) for r in rows]

    def delete(self, name: str) -> int:
        """Delete an adapter and every version: records first, then files (moved aside, then removed)."""
        check_name(name, "adapter")
        folder = self.adapter_dir(name)
        trash = None
        with self.transaction() as db:
            count = db.execute("SELECT COUNT(*) FROM versions WHERE name = ?", (name,)).fetchone()[0]
            reports = self._eval_ids(db, name)
            if not db.execute("DELETE FROM adapters WHERE name = ?", (name,)).rowcount:
                raise NotFound(f"adapter {name!r} not found", field="adapter")
            if folder.exists():
                trash = self.new_tmp_dir()
                folder.rename(trash)
        if trash is not None:
            paths.remove_tree(trash)
        self._remove_eval_reports(reports)
        return int(count)

    def import_peft_dir(self, source: Path, name: str) -> AdapterVersion:
        """Copy an existing PEFT adapter folder in as the next version of `name`."""
        import shutil

        check_name(name, "adapter")
        source = Path(source).expanduser().resolve()
        config_file = source / "adapter_config.json"
        weights = source / "adapter_model.safetensors"
        if not config_file.is_file():
            raise NotFound(f"{source.name}: no adapter_config.json (not a PEFT adapter folder)", field="path")
        if not weights.is_file():
            if (source / "adapter_model.bin").is_file():
                raise IntegrityError(f"{source.name}: adapter_model.bin is a pickle; loraforge imports "
                                     "safetensors only (convert it first)")
            raise NotFound(f"{source.name}: no adapter_model.safetensors", field="path")
        for file in ("adapter_config.json", "adapter_model.safetensors", "loraforge.json", "README.md"):
            if (source / file).is_symlink():
                raise IntegrityError(f"{source.name}: {file} is a symbolic link; import real files only")
        try:
            peft_config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise IntegrityError(f"{source.name}: adapter_config.json is not valid JSON") from None
        if not isinstance(peft_config, dict):
            raise IntegrityError(f"{source.name}: adapter_config.json is not a JSON object")
        shapes = _check_lora_weights(weights, peft_config, source.name)
        _check_fits_base(shapes, peft_config, source.name)
        staged = self.new_tmp_dir()
        staged.mkdir(parents=True)
        for file in ("adapter_config.json", "adapter_model.safetensors", "loraforge.json", "README.md"):
            if (source / file).is_file():
                shutil.copyfile(source / file, staged / file)
        base = peft_config.get("base_model_name_or_path") or "unknown"
        config = {"model_name": base, "r": peft_config.get("r"), "lora_alpha": peft_config.get("lora_alpha"),
                  "target_modules": peft_config.get("target_modules"), "imported_from": source.name}
        size = {"bytes_on_disk": weights.stat().st_size}
        return self.publish(name, staged, base_model=base, base_fingerprint=None, config=config, data_hash=None,
                            metrics={}, size=size)

    def export(self, ref: AdapterRef | str, target: Path) -> Path:
        """Write a verified copy of a version's folder to `target` (which must not exist)."""
        import shutil

        version = self.get(ref)
        source = self.verify(version)
        target = Path(target).expanduser().resolve()
        if target.exists():
            raise IntegrityError(f"{target.name} already exists; choose a new folder")
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
        shutil.copytree(source, tmp)
        paths.publish_dir(tmp, target)
        return target

    def verify(self, version: AdapterVersion) -> Path:
        """Check every file against its recorded sha256; return the folder, or raise IntegrityError."""
        try:
            if not version.path.is_dir():
                raise FileNotFoundError(version.path)
            linked = [p.name for p in [version.path, *version.path.rglob("*")] if p.is_symlink()]
            if linked:  # the store holds real files only: a link may point anywhere, and change
                raise IntegrityError(f"adapter {version.ref}: {linked[0]} is a symbolic link; refusing to load it")
            actual = sha256_files(version.path)
        except FileNotFoundError:
            raise IntegrityError(f"adapter {version.ref}: its files are missing from the store") from None
        if actual != version.files:
            changed = sorted(set(actual) ^ set(version.files) | {
                k for k in actual.keys() & version.files.keys() if actual[k] != version.files[k]})
            raise IntegrityError(f"adapter {version.ref} was modified on disk ({', '.join(changed)}); "
                                 "refusing to load it")
        return version.path


def _check_lora_weights(weights: Path, peft_config: dict, label: str) -> dict[str, tuple]:
    """Before anything is stored: the file is safetensors, holds only LoRA A/B (or saved-module) weights,
    and each A/B pair has the rank the config declares."""
    import re

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise IntegrityError(f"{label}: adapter_model.safetensors is not a readable safetensors file "
                             f"({type(exc).__name__})") from None
    if not shapes:
        raise IntegrityError(f"{label}: adapter_model.safetensors holds no tensors")
    r = peft_config.get("r")
    ranks = peft_config.get("rank_pattern") or {}
    saved = tuple(peft_config.get("modules_to_save") or ())
    lora = re.compile(r"\.lora_(A|B)(\.[^.]+)?\.weight$")
    for key, shape in shapes.items():
        match = lora.search(key)
        if match is None:
            if any(f".{m}." in key or key.endswith(f".{m}.weight") for m in saved) or "modules_to_save" in key:
                continue
            raise IntegrityError(f"{label}: tensor {key!r} is not a LoRA weight")
        if len(shape) != 2:
            raise IntegrityError(f"{label}: LoRA tensor {key!r} has shape {list(shape)}, not a matrix")
        rank = shape[0] if match.group(1) == "A" else shape[1]
        if isinstance(r, int) and not ranks and rank != r:
            raise IntegrityError(f"{label}: LoRA tensor {key!r} has rank {rank}, adapter_config.json says r={r}")
    return shapes


def _base_linear_shapes(base_name: str) -> dict[str, tuple[int, int]] | None:
    """{module name: (in_features, out_features)} of every linear layer of a base model, from its config
    alone (built on the meta device: no weights read); None where the config cannot be read offline."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.models.resolve import load_config, resolve_base_model

    try:
        ref = resolve_base_model(base_name)
        config = (AutoConfig.from_pretrained(ref.id, local_files_only=True) if ref.kind == "hub"
                  else load_config(ref))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (LoraforgeError, OSError, ValueError, KeyError):
        return None
    return {name: (module.in_features, module.out_features) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}


def _check_fits_base(shapes: dict[str, tuple], peft_config: dict, label: str) -> None:
    """Every LoRA pair names a linear layer of the adapter's base and has its width (A: r x in, B: out x r)."""
    import re

    base = peft_config.get("base_model_name_or_path")
    linear = _base_linear_shapes(base) if isinstance(base, str) and base else None
    if linear is None:
        return  # no base readable here: the fingerprint and peft check it when the adapter is loaded
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight$")
    for key, shape in shapes.items():
        match = pattern.match(key)
        if match is None:
            continue
        module, side = match.groups()
        if module not in linear:
            raise IntegrityError(f"{label}: {module} is not a linear layer of {base} (tensor {key!r})")
        width = linear[module][0] if side == "A" else linear[module][1]
        if (shape[1] if side == "A" else shape[0]) != width:
            raise IntegrityError(f"{label}: tensor {key!r} has shape {list(shape)}; {module} of {base} is "
                                 f"{linear[module][0]} -> {linear[module][1]}")

