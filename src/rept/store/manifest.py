"""Every field of an index manifest checked before anything trusts it.

A manifest is JSON that anyone can edit. Each field a reader uses is checked for its type and
range here, and the fields that depend on each other (the shard count and the dataset size, the
checksums and the shards) are checked together, so a damaged or edited manifest is one line that
names the field, never a traceback or a silently wrong answer.
"""

from __future__ import annotations

import re

from rept.errors import ReptError
from rept.query.search import MODES as SEARCH_MODES

STORE_DTYPE_NAMES = ("float32", "float16")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ReptError):
    """A manifest field that is missing, of the wrong type or out of range (one line)."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(low):
    return lambda v: _is_int(v) and v >= low, f"an integer >= {low}"


def _one_of(choices):
    return lambda v: v in choices, "one of " + ", ".join(map(str, choices))


_STR = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
_OPT_STR = (lambda v: v is None or isinstance(v, str), "a string or null")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_DICT = (lambda v: isinstance(v, dict), "a JSON object")
_HEX = (lambda v: isinstance(v, str) and bool(re.fullmatch(r"[0-9a-f]+", v)), "a hex digest")

# field -> (test, what it must be); checked in every manifest that has the field
COMMON = {
    "complete": _BOOL,
    "model": _DICT,
    "adapter": _OPT_STR,
    "dtype": _one_of(STORE_DTYPE_NAMES),
    "max_length": _int_at_least(1),
    "shard_size": _int_at_least(1),
    "rows": _int_at_least(0),
    "dataset": _DICT,
    "dataset_fingerprint": _HEX,
    "files": _DICT,
}
# a RepT signature index: these must be there
SIGNATURE = {
    "layer": _int_at_least(0),
    "mode": _one_of(SEARCH_MODES),
    "n_shards": _int_at_least(1),
    "stores_g_next": _BOOL,
    "model_weights_hash": _HEX,
    "tokenizer_hash": _HEX,
}
METHOD = {
    "method": _STR,
    "method_settings": _DICT,
    "n_shards": _int_at_least(0),
    "rows_fingerprint": _HEX,
}


def validate_manifest(manifest: dict, path) -> None:
    """Raise ManifestError naming the first field that is wrong."""
    method = manifest.get("kind") == "method"
    required = METHOD if method else SIGNATURE
    for name, (test, what) in {**COMMON, **required}.items():
        if name not in manifest:
            if name in required or (name in ("files", "rows") and manifest.get("complete") is True):
                raise ManifestError(f"{path}: field '{name}' is missing")
            continue
        if not test(manifest[name]):
            raise ManifestError(f"{path}: field '{name}' is {manifest[name]!r} (must be {what})")
    model = manifest["model"]
    if not isinstance(model.get("id"), str):
        raise ManifestError(f"{path}: field 'model.id' is {model.get('id')!r} (must be a string)")
    if not method:
        _check_signature_fields(manifest, model, path)
    if manifest.get("complete"):
        _check_files(manifest, path)


def _check_signature_fields(manifest: dict, model: dict, path) -> None:
    for name in ("num_layers", "hidden_size"):
        if not (_is_int(model.get(name)) and model[name] >= 1):
            raise ManifestError(f"{path}: field 'model.{name}' is {model.get(name)!r} (must be an integer >= 1)")
    if manifest["layer"] > model["num_layers"]:
        raise ManifestError(f"{path}: field 'layer' is {manifest['layer']} but the model has hidden states "
                            f"0..{model['num_layers']}")
    n_total = manifest["dataset"].get("n_total")
    if not (_is_int(n_total) and n_total >= 0):
        raise ManifestError(f"{path}: field 'dataset.n_total' is {n_total!r} (must be an integer >= 0)")
    if not isinstance(manifest["dataset"].get("source"), str):
        raise ManifestError(f"{path}: field 'dataset.source' is missing")
    expected = max(1, -(-n_total // manifest["shard_size"]))
    if manifest["n_shards"] != expected:
        raise ManifestError(f"{path}: field 'n_shards' is {manifest['n_shards']}, but {n_total} rows in shards of "
                            f"{manifest['shard_size']} make {expected}")
    if manifest["mode"] == "lookahead" and not manifest["stores_g_next"]:
        raise ManifestError(f"{path}: mode 'lookahead' needs stores_g_next true")


def _check_files(manifest: dict, path) -> None:
    files = manifest["files"]
    for name, entry in files.items():
        parts = name.split("/")
        if "\\" in name or name.startswith("/") or any(not p or p.startswith(".") for p in parts):
            raise ManifestError(f"{path}: field 'files' names {name!r}, which is not a file of the index folder")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])
                and _is_int(entry.get("bytes")) and entry["bytes"] >= 0):
            raise ManifestError(f"{path}: field 'files.{name}' must hold a sha256 and a byte count")
    shards = [n for n in files if n.startswith("shard-")]
    if len(shards) != manifest["n_shards"]:
        raise ManifestError(f"{path}: field 'files' lists {len(shards)} shards, n_shards is {manifest['n_shards']}")
