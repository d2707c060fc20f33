"""Read rows from local files (JSONL, JSON, Parquet, CSV), saved `datasets` folders or hub dataset names."""

from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    """A bad data source or row; the message names the file, the row index (counted from 0, as it says) and
    the field."""

    def __init__(self, source: str, message: str, row: int | None = None, field: str | None = None):
        where = str(source)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        note = " (rows count from 0)" if row is not None else ""
        super().__init__(f"{where}: {message}{note}")
        self.source, self.row, self.field = source, row, field


def load_rows(source: str, split: str = "train") -> list[dict]:
    """All rows of `source` as dicts, in file order. Raises DataError naming file and row on bad input."""
    if not source:
        raise DataError("<data>", "no data given: set `data` to a .jsonl/.json/.parquet/.csv file or a dataset")
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in (".jsonl", ".ndjson"):
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json(path)
        elif suffix in (".parquet", ".csv"):
            rows = _read_table(path, suffix)
        else:
            raise DataError(source, f"unsupported file type '{suffix}': use .jsonl, .json, .parquet or .csv")
    elif path.is_dir():
        rows = _read_datasets_folder(path, split)
    elif suffix in (".jsonl", ".json", ".parquet", ".csv") or "/" not in source:
        raise DataError(source, "file not found")
    else:
        rows = _read_hub(source, split)
    if not rows:
        raise DataError(source, "no rows: the data source is empty")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(str(path), _not_utf8(path, err)) from None
    for line_no, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(str(path), f"invalid JSON on line {line_no + 1}: {err.msg}", row=len(rows)) from None
        if not isinstance(row, dict):
            raise DataError(str(path), f"line {line_no + 1} is a {type(row).__name__}, expected a JSON object",
                            row=len(rows))
        rows.append(row)
    return rows


def _not_utf8(path: Path, err: UnicodeDecodeError) -> str:
    """Where the first byte that is not UTF-8 is: its line (from 1) and its byte offset in the file."""
    line = err.object[:err.start].count(b"\n") + 1
    return f"not UTF-8 text (line {line}, byte {err.start} of the file); re-save the file as UTF-8"


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(str(path), _not_utf8(path, err)) from None
    except json.JSONDecodeError as err:
        raise DataError(str(path), f"invalid JSON at line {err.lineno}: {err.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(path), "expected a JSON list of objects (or {\"data\": [...]})")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(str(path), f"expected a JSON object, got {type(row).__name__}", row=i)
    return data


def _read_table(path: Path, suffix: str) -> list[dict]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path, keep_default_na=False, dtype=str)
    except Exception as err:  # pandas raises many types for a broken file
        raise DataError(str(path), f"cannot read {suffix[1:]} file: {err}") from None
    return [_plain(row) for row in frame.to_dict(orient="records")]


def _plain(value):
    """numpy arrays/scalars from Parquet → plain Python lists/scalars."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _read_datasets_folder(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(str(path), f"not a saved `datasets` folder ({err})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(str(path), f"no split '{split}'; available: {sorted(data)}")
        data = data[split]
    return [dict(row) for row in data]


def _read_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataError(name, f"cannot load dataset: {err}") from None
    return [dict(row) for row in data]
