"""The benchmark's output folder: settings, and per-prompt records that make a run resumable.

    settings.json   what every record in the folder was measured under (model, dtype, draft
                    length, token limit, seed, ...), the machine and library versions, the
                    decoders seen, and one entry per session (command, start, end)
    records.jsonl   one line per (temperature, prompt, decoder): the tokens, stop reason and
                    Stats trace of each timed repeat
    quality.json    with a dLLM: its answers' quality against the AR model (bench/quality.py),
                    recomputed from the records by every run

A record is appended as soon as it is measured, so an interrupted run loses at most the
prompt in flight; a restart skips what is done. A folder refuses a run whose settings
differ from its own, and a second run while one holds its lock (.lock). Knows nothing of
models or decoding.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from diffdraft.files import first_missing
from diffdraft.errors import DiffdraftError
from diffdraft.stats import Stats

SETTINGS_FILE = "settings.json"
RECORDS_FILE = "records.jsonl"
QUALITY_FILE = "quality.json"
LOCK_FILE = ".lock"
# Settings that must match for records to be pooled; decoders, temperatures, prompts and
# repeats may differ between sessions (each record says which it is).
FIXED_SETTINGS = ("suite", "turn", "model", "dtype", "draft_len", "verify", "early_exit_layers", "max_new_tokens", "seed")


def stats_to_dict(stats: Stats) -> dict:
    """The whole trace (Stats.to_dict is a summary and cannot be read back)."""
    return dataclasses.asdict(stats)


def stats_from_dict(data: dict) -> Stats:
    return Stats(**data)


def record_key(record: dict) -> tuple[float, str, str]:
    return float(record["temperature"]), str(record["prompt_id"]), str(record["decoder"])


class RecordStore:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise DiffdraftError(f"output path {self.folder} exists and is not a folder")
        self.settings_path = self.folder / SETTINGS_FILE
        self.records_path = self.folder / RECORDS_FILE

    @contextmanager
    def lock(self):
        """Hold the folder for one run: a second run writing into it would mix its timings in."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        created = first_missing(self.folder)
        lock_path = self.folder / LOCK_FILE
        new_lock = not lock_path.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            with open(lock_path, "w") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise DiffdraftError(f"another diffdraft bench is running in {self.folder}") from None
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            if not self.settings_path.exists():  # a run refused before it wrote anything leaves nothing behind
                if created is not None:
                    shutil.rmtree(created, ignore_errors=True)
                elif new_lock:
                    lock_path.unlink(missing_ok=True)

    # ----- settings -----
    def read_settings(self) -> dict | None:
        if not self.settings_path.is_file():
            return None
        try:
            data = json.loads(self.settings_path.read_text())
        except json.JSONDecodeError as err:
            raise DiffdraftError(f"corrupt {self.settings_path}: {err}") from err
        if not isinstance(data, dict):
            raise DiffdraftError(f"corrupt {self.settings_path}: expected a JSON object")
        return data

    def write_settings(self, settings: dict) -> None:
        self._write_json(self.settings_path, settings)

    def _write_json(self, path: Path, data: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)

    # ----- the dLLM's quality figures (bench/quality.py), recomputed from the records by each run -----
    def write_quality(self, quality: dict) -> None:
        self._write_json(self.folder / QUALITY_FILE, quality)

    def read_quality(self) -> dict:
        path = self.folder / QUALITY_FILE
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DiffdraftError(f"corrupt {path}: {err}") from err
        return data if isinstance(data, dict) else {}

    def check_settings(self, fixed: dict) -> dict:
        """The folder's settings, created from `fixed` if new; an error if they differ."""
        settings = self.read_settings()
        if settings is None:
            return {"fixed": dict(fixed), "decoders": {}, "sessions": []}
        differ = {k: (settings["fixed"].get(k), fixed.get(k)) for k in FIXED_SETTINGS
                  if settings["fixed"].get(k) != fixed.get(k)}
        if differ:
            listed = ", ".join(f"{k} {old!r} there vs {new!r} now" for k, (old, new) in differ.items())
            raise DiffdraftError(f"{self.folder} holds a run with other settings ({listed}): use another --out folder")
        return settings

    # ----- records -----
    def load(self) -> list[dict]:
        """All records; a torn last line (an interrupted write) is dropped with a warning."""
        if not self.records_path.is_file():
            return []
        lines = self.records_path.read_text(encoding="utf-8").splitlines()
        records = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if n == len(lines):
                    print(f"diffdraft: dropping a torn last line in {self.records_path}", file=sys.stderr)
                    continue
                raise DiffdraftError(f"{self.records_path} line {n} is not valid JSON: {err.msg}") from err
            if not isinstance(record, dict) or not {"temperature", "prompt_id", "decoder", "runs"} <= record.keys():
                raise DiffdraftError(f"{self.records_path} line {n} is not a benchmark record")
            records.append(record)
        return records

    def append(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.records_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def repair(self) -> None:
        """Rewrite records.jsonl without a torn last line, so appends start on a fresh line."""
        if not self.records_path.is_file():
            return
        text = self.records_path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            keep = text[: text.rfind("\n") + 1]
            tmp = self.records_path.with_suffix(".tmp")
            tmp.write_text(keep, encoding="utf-8")
            os.replace(tmp, self.records_path)
