"""Loading instruction datasets: HF `save_to_disk` folders, JSONL, JSON, CSV and Parquet,
with the prompt/response/label columns found by their common names or given explicitly."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rept.errors import ReptError
from rept.store.safefile import output_mode, write_atomic

PROMPT_NAMES = ("prompts", "prompt", "instruction", "question", "input")
RESPONSE_NAMES = ("response", "output", "completion", "answer", "expected_response")
LABEL_NAMES = ("label", "labels", "category")
HF_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")


class DataError(ReptError):
    """A user-facing data problem, naming the file and the problem in one line."""


@dataclass(frozen=True)
class Row:
    index: int          # position in the source dataset (skipped rows count too)
    prompt: str
    response: str
    label: str | None   # None when the dataset has no label column (or the cell is empty)


@dataclass(frozen=True)
class DataSettings:
    """Where a training set is and which columns hold what (a column left None is found by its name)."""
    path: str
    prompt_column: str | None = None
    response_column: str | None = None
    label_column: str | None = None

    def load(self) -> "Dataset":
        return load_dataset(self.path, self.prompt_column, self.response_column, self.label_column)


@dataclass
class Dataset:
    rows: list[Row]              # rows kept (empty responses removed)
    source: str                  # absolute path as given
    fingerprint: str             # sha256 over (prompt, response, label) of every source row, in order
    columns: dict                # {"prompt": name, "response": name or None, "label": name or None}
    skipped_empty: list[int] = field(default_factory=list)
    n_total: int = 0


# ---------------------------------------------------------------------------------------- reading

def rows_fingerprint(rows) -> str:
    """sha256 over each row's (index, prompt, response), in order: which rows a model or an index saw."""
    digest = hashlib.sha256()
    for r in rows:
        digest.update(json.dumps([r.index, r.prompt, r.response]).encode())
    return digest.hexdigest()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """JSON objects, one per line; blank lines ignored; a bad line is reported by its number."""
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


def _read_json(path: Path) -> list[dict]:
    """A list of objects, {"data": [...]}, a dict of equal-length columns, or JSON lines
    (what HF `Dataset.to_json` writes, even to a .json name)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # more than one top-level value: JSON lines
            return read_jsonl(path)
        raise DataError(f"{path.name}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if isinstance(value, dict):
        lists = list(value.values())
        if lists and all(isinstance(v, list) and len(v) == len(lists[0]) for v in lists):
            value = [dict(zip(value, cells)) for cells in zip(*lists)]  # column-oriented
        else:
            value = [value]  # a single object (a one-line JSON-lines file)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise DataError(f"{path.name}: expected a list of JSON objects")
    return value


def _hf_split_folder(path: Path, split: str | None) -> Path:
    """The folder of one split: a DatasetDict folder holds one sub-folder per split."""
    if not (path / "dataset_dict.json").exists():
        return path
    splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    chosen = split or ("train" if "train" in splits else None)
    if chosen not in splits:
        what = f"no split '{split}'" if split else "no 'train' split"
        raise DataError(f"{path.name}: {what} (splits: {', '.join(splits)}); choose one with --split")
    return path / chosen


def _read_hf_folder(path: Path, split: str | None) -> list[dict]:
    import datasets

    folder = _hf_split_folder(path, split)
    try:
        return datasets.load_from_disk(str(folder)).to_list()
    except Exception as exc:  # datasets raises several types for unreadable folders
        raise DataError(f"{path.name}: cannot read as a Hugging Face dataset ({_first_line(exc)})") from None


def _read_csv(path: Path) -> list[dict]:
    import pandas as pd

    try:
        # Every cell as a string, and missing cells as "" rather than NaN.
        return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
    except pd.errors.EmptyDataError:  # a 0-byte file: no header at all
        return []


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    # pyarrow keeps Python types (ints stay ints, nulls are None), unlike a pandas round trip.
    return pq.read_table(path).to_pylist()


READERS = {".jsonl": read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def check_data_path(path: str) -> None:
    """The checks that need no reading: the path exists and is a kind rept reads (a save_to_disk
    folder, or a file with a known suffix). `rept.preflight` runs them before anything heavy loads."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such file: {path}")  # hub ids are not fetched: rept works offline
    if p.is_dir():
        if not any((p / marker).exists() for marker in HF_MARKERS):
            raise DataError(f"{path} is a folder but not a Hugging Face dataset saved with save_to_disk")
    elif p.suffix.lower() not in READERS:
        raise DataError(f"{p.name}: unsupported format '{p.suffix}' "
                        "(use a save_to_disk folder, .jsonl, .json, .csv or .parquet)")


def read_records(path: str, split: str | None = None) -> list[dict]:
    """The rows of a data file as dicts, whatever the format (decided by the path)."""
    check_data_path(path)
    p = Path(path)
    if p.is_dir():
        return _read_hf_folder(p, split)
    reader = READERS[p.suffix.lower()]
    try:
        return reader(p)
    except DataError:
        raise
    except Exception as exc:  # pandas/pyarrow parse errors, bad encodings, unreadable files
        raise unreadable(p, exc) from None


def unreadable(path: str | os.PathLike, exc: Exception) -> DataError:
    """The one-line error for a file that exists but cannot be parsed."""
    name = os.path.basename(path)
    if isinstance(exc, UnicodeDecodeError):
        return DataError(f"{name}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                         "save it as UTF-8")
    return DataError(f"{name}: cannot read ({_first_line(exc)})")


QUERY_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def check_queries_path(path: str) -> None:
    """Like check_data_path, for a queries file (`--queries`): a .jsonl, .json, .csv or .parquet file."""
    if not os.path.exists(path):
        raise DataError(f"no such queries file: {path}")
    if Path(path).suffix.lower() not in QUERY_SUFFIXES:
        raise DataError(f"{path}: queries must be .jsonl, .json, .csv or .parquet")


def class_label_names(path: str, split: str | None = None) -> dict[str, list[str]]:
    """{column: names} for the ClassLabel columns of a save_to_disk folder or of a Parquet file
    written by `datasets` (whose schema carries the features): their cells are stored as integers."""
    p = Path(path)
    try:
        import datasets

        if p.is_dir():
            features = datasets.load_from_disk(str(_hf_split_folder(p, split))).features
        elif p.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            features = datasets.Features.from_arrow_schema(pq.read_schema(p))
        else:
            return {}
    except Exception:  # no readable features: the cells are taken as they are
        return {}
    return {name: list(f.names) for name, f in features.items() if isinstance(f, datasets.ClassLabel)}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------- columns

def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def cell_text(value, column: str, row: int, source: str) -> str:
    """A prompt or response cell as text: a string, a number, or empty. A list, a dict or any other
    structure is refused (its Python repr is not what the model was trained on)."""
    if isinstance(value, (str, numbers.Number)) or value is None:
        return _text(value)
    raise DataError(f"{source} row {row + 1}: column '{column}' holds a {type(value).__name__}, not text "
                    "(one string per cell)")


def cell_label(value, column: str, row: int, source: str) -> tuple[str | None, str | None]:
    """(label, kind) of a label cell: text, a number or true/false (spelled as in JSON); kind says
    which, so that a column mixing them (1 and "1") can be refused instead of merged."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None, None
    if isinstance(value, bool):
        return ("true" if value else "false"), "true/false"
    if isinstance(value, str):
        return value, "text"
    if isinstance(value, numbers.Number):
        return str(value), "number"
    raise DataError(f"{source} row {row + 1}: column '{column}' holds a {type(value).__name__}, not a label "
                    "(text, a number or true/false)")


class LabelKinds:
    """Remembers the first row of each kind of label cell; a column of two kinds is an error."""

    def __init__(self, column: str, source: str):
        self.column, self.source, self.first = column, source, {}

    def see(self, kind: str | None, row: int, value) -> None:
        if kind is None or kind in self.first:
            return
        self.first[kind] = (row, value)
        if len(self.first) > 1:
            (k1, (r1, v1)), (k2, (r2, v2)) = list(self.first.items())[:2]
            raise DataError(f"{self.source}: column '{self.column}' mixes {k1} (row {r1 + 1}: {v1!r}) and {k2} "
                            f"(row {r2 + 1}: {v2!r}) labels; give every row the same kind")


def _pick(columns: list[str], given: str | None, names: tuple[str, ...], what: str, source: str,
          required: bool = True) -> str | None:
    """The column to use: the one given (which must exist), else the first common name present."""
    listing = ", ".join(map(str, columns))
    if given:
        if given not in columns:
            raise DataError(f"{source}: no column '{given}' (columns: {listing})")
        return given
    found = next((c for c in names if c in columns), None)
    if found is None and required:
        raise DataError(f"{source}: no {what} column (looked for {', '.join(names)}; columns: {listing}); "
                        f"name it with --{what}-column")
    return found


def _all_columns(records: list[dict]) -> list[str]:
    columns = list(records[0])
    seen = set(columns)
    for rec in records[1:]:  # JSONL rows may differ in their keys
        new = [k for k in rec if k not in seen]
        columns += new
        seen.update(new)
    return columns


def load_dataset(path: str, prompt_column: str | None = None, response_column: str | None = None,
                 label_column: str | None = None, require_response: bool = True, split: str | None = None) -> Dataset:
    """Load an instruction dataset. With require_response=False (query/prompt files) the response
    column is optional and rows with an empty response are kept."""
    records = read_records(path, split)
    name = os.path.basename(os.path.normpath(path))
    if not records:
        raise DataError(f"{name}: the dataset is empty")
    columns = _all_columns(records)
    prompt_col = _pick(columns, prompt_column, PROMPT_NAMES, "prompt", name)
    response_col = _pick(columns, response_column, RESPONSE_NAMES, "response", name, required=require_response)
    label_col = _pick(columns, label_column, LABEL_NAMES, "label", name, required=False)
    # Alpaca style: the optional `input` belongs to the instruction. Only when the prompt column
    # was found by name; an explicit --prompt-column means exactly that column.
    alpaca_input = prompt_col == "instruction" and "input" in columns and not prompt_column
    # A ClassLabel label column holds integers; rows are labelled by the names (-1: no label).
    label_names = class_label_names(path, split).get(label_col) if label_col else None

    digest = hashlib.sha256()
    rows, empty = [], []
    kinds = LabelKinds(label_col, name) if label_col else None
    for i, rec in enumerate(records):
        prompt = cell_text(rec.get(prompt_col), prompt_col, i, name)
        extra = cell_text(rec.get("input"), "input", i, name) if alpaca_input else ""
        if extra.strip():
            prompt = prompt + "\n\n" + extra
        response = cell_text(rec.get(response_col), response_col, i, name) if response_col else ""
        label = None  # an empty label cell means "no label"
        if label_col:
            cell = rec.get(label_col)
            if label_names is not None and isinstance(cell, numbers.Integral) and not isinstance(cell, bool):
                cell = label_names[cell] if 0 <= cell < len(label_names) else None
            label, kind = cell_label(cell, label_col, i, name)
            kinds.see(kind, i, cell)
        # Every source row counts, skipped or not, so the fingerprint names the file's content.
        digest.update(json.dumps([prompt, response, label]).encode())
        if require_response and not response.strip():
            empty.append(i)
            continue
        rows.append(Row(i, prompt, response, label))
    if not rows:
        raise DataError(f"{name}: every row has an empty response")
    return Dataset(rows, str(Path(path).resolve()), digest.hexdigest(),
                   {"prompt": prompt_col, "response": response_col, "label": label_col}, empty, len(records))


def load_prompts(path: str, prompt_column: str | None = None) -> list[str]:
    """The prompts of a test-prompt file (any format load_dataset reads); no response needed."""
    return [r.prompt for r in load_dataset(path, prompt_column, require_response=False).rows]


# ---------------------------------------------------------------------------------------- writing

def _like_features(like: str | os.PathLike | None, columns: list[str]):
    """The HF features (column types, ClassLabel names) of the dataset `like`, when it is a
    save_to_disk folder or a Parquet file with exactly these columns; else None (types inferred)."""
    if like is None:
        return None
    import datasets

    p = Path(like)
    if p.is_dir():
        features = datasets.load_from_disk(str(_hf_split_folder(p, None))).features
    elif p.suffix.lower() == ".parquet" and p.is_file():
        import pyarrow.parquet as pq

        features = datasets.Features.from_arrow_schema(pq.read_schema(p))
    else:
        return None  # JSONL/CSV carry no types worth keeping
    return features if not columns or set(features) == set(columns) else None


def _write_jsonl(rows, tmp, features):
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    Path(tmp).write_text(text, encoding="utf-8")


def _write_json(rows, tmp, features):
    Path(tmp).write_text(json.dumps(rows, ensure_ascii=False, indent=1, default=str), encoding="utf-8")


def _write_csv(rows, tmp, features):
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp, index=False)


def _write_parquet(rows, tmp, features):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = features.arrow_schema if features is not None else None
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)


WRITERS = {".jsonl": _write_jsonl, ".json": _write_json, ".csv": _write_csv, ".parquet": _write_parquet}


def _write_hf_folder(rows, path: Path, features) -> None:
    import datasets

    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        # Column-wise, so that an empty list of rows still gets `like`'s columns.
        columns = list(features) if features is not None else _all_columns(rows) if rows else []
        table = {c: [r.get(c) for r in rows] for c in columns}
        dataset = datasets.Dataset.from_dict(table, features=features)
        # At least one shard: datasets writes none for 0 rows, and then cannot load the folder.
        dataset.save_to_disk(str(tmp / "new"), num_shards=1 if not rows else None)
        os.chmod(tmp / "new", output_mode(folder=True))  # the folder datasets made is an ordinary one
        if path.exists():  # a folder cannot be replaced in one step: move the old one aside first
            os.replace(path, tmp / "old")
        os.replace(tmp / "new", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_rows(rows: list[dict], path: str | os.PathLike, like: str | os.PathLike | None = None) -> None:
    """Write dict rows in the format `path` names (.jsonl, .json, .csv, .parquet, or a save_to_disk
    folder when it has no suffix), atomically: a temp name in the same folder, then a rename.
    `like`: the dataset the rows came from; a save_to_disk folder or Parquet file with the same
    columns lends its column types to Parquet/folder output (so e.g. ClassLabel names survive)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    writer = WRITERS.get(suffix)
    if suffix and writer is None:
        raise DataError(f"cannot write '{suffix}' files (use .jsonl, .json, .csv, .parquet or a folder)")
    columns = _all_columns(rows) if rows else []
    features = _like_features(like, columns) if suffix in ("", ".parquet") else None
    if not suffix:
        _write_hf_folder(rows, path, features)
        return
    write_atomic(path, lambda tmp: writer(rows, tmp, features))  # never a half-written file
