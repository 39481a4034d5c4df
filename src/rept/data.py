"""Loading instruction datasets: HF `save_to_disk` folders, JSONL, JSON, CSV and Parquet,
with the prompt/response/label columns found by their common names or given explicitly."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rept.errors import ReptError

PROMPT_NAMES = ("prompts", "prompt", "instruction", "question", "input")
RESPONSE_NAMES = ("response", "output", "completion", "answer", "expected_response")
LABEL_NAMES = ("label", "labels", "category")


class DataError(ReptError):
    """A user-facing data problem, naming the file and the problem in one line."""


@dataclass(frozen=True)
class Row:
    index: int          # position in the source dataset (skipped rows count too)
    prompt: str
    response: str
    label: str | None   # None when the dataset has no label column


@dataclass
class Dataset:
    rows: list[Row]              # rows kept (empty responses removed)
    source: str                  # absolute path as given
    fingerprint: str             # sha256 over every source row, in order
    columns: dict                # {"prompt": name, "response": name, "label": name or None}
    skipped_empty: list[int] = field(default_factory=list)
    n_total: int = 0


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    name = os.path.basename(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{name} line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(value, dict):
                raise DataError(f"{name} line {number}: expected a JSON object, got {type(value).__name__}")
            records.append(value)
    return records


def _read_hf_folder(path: Path, split: str | None) -> list[dict]:
    import datasets

    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        chosen = split or ("train" if "train" in splits else None)
        if chosen not in splits:
            raise DataError(f"{path.name}: a dataset with splits {', '.join(splits)}; choose one with --split")
        path = path / chosen
    try:
        return datasets.load_from_disk(str(path)).to_list()
    except Exception as exc:  # datasets raises several types for unreadable folders
        raise DataError(f"{path}: cannot read as a Hugging Face dataset ({str(exc).splitlines()[0]})") from None


def read_records(path: str, split: str | None = None) -> list[dict]:
    """The rows of a data file as dicts, whatever the format."""
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise DataError(f"no such file: {path}")
    name = p.name
    if p.is_dir():
        if not any((p / f).exists() for f in ("state.json", "dataset_info.json", "dataset_dict.json")):
            raise DataError(f"{path} is a folder but not a Hugging Face dataset saved with save_to_disk")
        return _read_hf_folder(p, split)
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            return read_jsonl(p)
        if suffix == ".json":
            value = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(value, dict) and isinstance(value.get("data"), list):
                value = value["data"]
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise DataError(f"{name}: expected a list of JSON objects")
            return value
        if suffix == ".csv":
            return pd.read_csv(p, dtype=str, keep_default_na=False).to_dict("records")
        if suffix == ".parquet":
            return pd.read_parquet(p).to_dict("records")
    except DataError:
        raise
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except Exception as exc:  # pandas/pyarrow parse errors
        raise DataError(f"{name}: cannot read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    raise DataError(f"{name}: unsupported format '{suffix}' (use a save_to_disk folder, .jsonl, .json, .csv or .parquet)")


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def _pick(columns: list[str], given: str | None, names: tuple[str, ...], what: str, source: str,
          required: bool = True) -> str | None:
    if given:
        if given not in columns:
            raise DataError(f"{source}: no column '{given}' (columns: {', '.join(columns)})")
        return given
    found = next((c for c in names if c in columns), None)
    if found is None and required:
        raise DataError(f"{source}: no {what} column (looked for {', '.join(names)}; columns: {', '.join(columns)}); "
                        f"name it with --{what}-column")
    return found


def load_dataset(path: str, prompt_column: str | None = None, response_column: str | None = None,
                 label_column: str | None = None, require_response: bool = True, split: str | None = None) -> Dataset:
    records = read_records(path, split)
    name = os.path.basename(os.path.normpath(path))
    if not records:
        raise DataError(f"{name}: the dataset is empty")
    columns = list(records[0].keys())
    for rec in records[1:]:  # JSONL rows may differ in their keys
        columns += [k for k in rec if k not in columns]
    prompt_col = _pick(columns, prompt_column, PROMPT_NAMES, "prompt", name)
    response_col = _pick(columns, response_column, RESPONSE_NAMES, "response", name, required=require_response)
    label_col = _pick(columns, label_column, LABEL_NAMES, "label", name, required=False)
    # Alpaca style: the instruction's optional input is part of the prompt.
    alpaca_input = prompt_col == "instruction" and "input" in columns and not prompt_column

    digest = hashlib.sha256()
    rows, empty = [], []
    for i, rec in enumerate(records):
        prompt = _text(rec.get(prompt_col))
        if alpaca_input and _text(rec.get("input")).strip():
            prompt = prompt + "\n\n" + _text(rec.get("input"))
        response = _text(rec.get(response_col)) if response_col else ""
        label = rec.get(label_col) if label_col else None
        label = None if label is None or _text(label) == "" else _text(label)
        digest.update(json.dumps([prompt, response, label]).encode())
        if require_response and not response.strip():
            empty.append(i)
            continue
        rows.append(Row(i, prompt, response, label))
    if not rows:
        raise DataError(f"{name}: every row has an empty response")
    source = str(Path(path).resolve())
    return Dataset(rows, source, digest.hexdigest(),
                   {"prompt": prompt_col, "response": response_col, "label": label_col}, empty, len(records))


def load_prompts(path: str, prompt_column: str | None = None) -> list[str]:
    return [r.prompt for r in load_dataset(path, prompt_column, require_response=False).rows]


def write_rows(rows: list[dict], path: str | os.PathLike) -> None:
    """Write dict rows in the format `path` names (.jsonl, .json, .csv, .parquet, or a
    save_to_disk folder when it has no suffix), atomically: temp name, then rename."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == "":
        import shutil

        import datasets

        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "d"))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp / "d", path)
        shutil.rmtree(tmp)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    if suffix == ".jsonl":
        Path(tmp).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        Path(tmp).write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(tmp, index=False)
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    else:
        os.remove(tmp)
        raise DataError(f"cannot write '{suffix}' files (use .jsonl, .json, .csv, .parquet or a folder)")
    os.replace(tmp, path)
