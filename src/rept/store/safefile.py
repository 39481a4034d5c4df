"""Files rept reads back without trusting them: tensors in safetensors, everything else in JSON.

Nothing rept reads is unpickled: a pickle (`torch.save`'s format) runs code when it is loaded.
Optimizer and training state are written here as one safetensors file whose metadata holds the
JSON part (scalars, settings), and file digests are computed by streaming the bytes once.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from rept.errors import ReptError

JSON_KEY = "rept"  # the safetensors metadata key that holds the JSON part
_CHUNK = 1 << 22


class UnsafeFileError(ReptError):
    """A file rept will not read as it is (a pickle, or damaged)."""


def output_mode(folder: bool = False) -> int:
    """The mode an ordinary new file (or folder) gets under this process's umask: what rept's
    outputs get too, although mkstemp/mkdtemp make them private (0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def temp_path(path: Path) -> str:
    """A fresh temporary name beside `path` (same filesystem, so the final rename is atomic)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, output_mode())
    return tmp


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it into place: a reader
    sees the old file or the whole new one, a failed write leaves nothing, and the file gets the
    mode an ordinary one would (the umask's)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, output_mode())  # writers such as safetensors make the file anew, private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_tensors(path: str | os.PathLike, tensors: dict, info: dict) -> None:
    """Write `tensors` (name -> torch tensor) and the JSON-able `info` to one safetensors file, atomically."""
    from safetensors.torch import save_file

    write_atomic(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                                             metadata={JSON_KEY: json.dumps(info)}))


def load_tensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """The tensors and the JSON part written by `save_tensors`; a damaged file is one line."""
    from safetensors.torch import load as load_safetensors_bytes

    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = load_safetensors_bytes(data)
        info = json.loads(read_header(data, path)[1].get(JSON_KEY, "{}"))
    except UnsafeFileError:
        raise
    except Exception as exc:  # safetensors and json raise their own types for damaged files
        raise UnsafeFileError(f"{path} is damaged ({type(exc).__name__}): write it again") from None
    return tensors, info


def read_header(data: bytes, path) -> tuple[dict, dict]:
    """(tensor entries, metadata) of safetensors bytes: the 8-byte length, then a JSON header."""
    if len(data) < 8:
        raise UnsafeFileError(f"{path} is truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise UnsafeFileError(f"{path} is truncated (its header claims {n} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UnsafeFileError(f"{path} has a damaged header") from None
    if not isinstance(header, dict):
        raise UnsafeFileError(f"{path} has a damaged header")
    meta = header.pop("__metadata__", None) or {}
    return header, meta


def refuse_pickle(path: Path, instead: str) -> None:
    """Raise when `path` exists: it is a pickle from an older rept, which is never loaded."""
    if path.exists():
        raise UnsafeFileError(f"{path} is a pickle (written by an older rept), and rept does not load pickles: "
                              f"they can run code. {instead}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in chunks (a model file can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
