"""Loading Hugging Face causal LMs (plus an optional PEFT adapter), addressing their layers,
and building tiny models and tokenizers from scratch for the demo and the tests."""

from __future__ import annotations

from rept.errors import ReptError

import contextlib
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# Names under which architectures keep the final norm whose output is hidden_states[-1].
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "norm_f", "final_layernorm")


class ModelError(ReptError):
    """A user-facing problem with a model, adapter or tokenizer (one line)."""


@dataclass(frozen=True)
class ModelSettings:
    """Which model to load and how: a folder, Hub id, .gguf file or known name; a PEFT adapter folder;
    the compute dtype; the device (None: cuda when available, else cpu)."""
    model: str
    adapter: str | None = None
    dtype: str = "float32"
    device: str | None = None

    def load(self) -> "LoadedModel":
        return load_model(self.model, self.adapter, dtype=self.dtype, device=self.device)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_id: str
    adapter: str | None = None
    # The folder whose weight files hold exactly the base weights of `model` (set where the model was
    # loaded from or saved to one); the model's identity is then those files' bytes (weights_identity).
    weights_source: str | None = None

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# "gpt2", "Qwen/Qwen2.5-0.5B": what the Hugging Face Hub accepts as a model id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(name: str) -> bool:
    """True for a name that is not a local path and reads as a Hub model id (downloaded or cached)."""
    return not os.path.exists(name) and bool(_HUB_ID.match(name))


def model_source_exists(name: str) -> bool:
    """A model is a local folder or a Hub id; anything else is a folder that is not there."""
    return os.path.exists(name) or is_hub_id(name)


def model_reference(name: str) -> str:
    """How an index records a model: a local folder by its absolute path, a Hub id as it is."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def check_model_source(name: str, what: str = "model") -> None:
    if not model_source_exists(name):
        raise ModelError(f"no such {what} folder: {name}")
    if is_hub_id(name) and hub_offline() and not _in_hub_cache(name):
        raise ModelError(f"{what} {name} is a Hub id that is not in the local cache, and HF_HUB_OFFLINE is set: "
                         "give a local folder, or download it where the Hub can be reached")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def pick_device(device: str | None = None) -> torch.device:
    from rept.preflight import check_device

    check_device(device)  # one line for a device that is not there, not torch's AssertionError
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model_id: str, adapter: str | None = None, dtype: str = "float32",
               device: str | None = None, merge_adapter: bool = True) -> LoadedModel:
    """Load model + tokenizer for tracing: eval mode, no parameter requires grad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rept.model.gguf import resolve_model_source

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}' (choose from {', '.join(sorted(DTYPES))})")
    model_id = resolve_model_source(model_id)  # a GGUF file or a known name: its converted folder
    check_model_source(model_id)
    tokenizer_src = model_id
    if adapter and os.path.exists(os.path.join(adapter, "tokenizer_config.json")):
        tokenizer_src = adapter
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
    except Exception as exc:  # transformers raises many kinds here
        raise ModelError(f"cannot load a tokenizer from {tokenizer_src}: {_first_line(exc)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=DTYPES[dtype])
    except Exception as exc:
        raise ModelError(f"cannot load a causal LM from {model_id}: {_first_line(exc)}") from None
    if adapter:
        model = attach_adapter(model, adapter, merge=merge_adapter)
    prepare_tokenizer(tokenizer)
    model.to(pick_device(device)).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, model_id, adapter, model_id if os.path.isdir(model_id) else None)


@contextlib.contextmanager
def quiet_peft():
    """peft asks transformers a deprecated question (is_gradient_checkpointing) when it makes a
    trainable adapter; the FutureWarning it prints is not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def attach_adapter(model, adapter: str, merge: bool = True, trainable: bool = False):
    from peft import PeftModel

    if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        raise ModelError(f"no PEFT adapter in {adapter} (adapter_config.json missing)")
    with quiet_peft():
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    # Merging is exact and makes the forward pass as cheap as the base model's.
    return model.merge_and_unload() if merge else model


def prepare_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError("rept needs a fast (Rust) tokenizer for character offsets")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (the first ModuleList as long as the config says)."""
    base = getattr(model, "get_base_model", lambda: model)()
    n = getattr(base.config, "num_hidden_layers", None) or getattr(base.config, "n_layer", None)
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ModelError(f"cannot find the {n} transformer blocks of {type(base).__name__}")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block; its output is hidden_states[-1] in transformers."""
    base = getattr(model, "get_base_model", lambda: model)()
    inner = getattr(base, "base_model", base)
    for name in _FINAL_NORM_NAMES:
        module = getattr(inner, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ModelError(f"cannot find the final norm of {type(base).__name__}; use a layer below the last")


def resolve_layer(model: nn.Module, layer: int) -> int:
    """Map a hidden_states index (negative counts from the end) to 0..num_layers."""
    n = len(decoder_layers(model))
    resolved = layer + n + 1 if layer < 0 else layer
    if not 0 <= resolved <= n:
        raise ModelError(f"layer {layer} is out of range: this model has hidden states 0..{n} (or -{n + 1}..-1)")
    return resolved


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


def config_hash(model: nn.Module) -> str:
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
        cfg.pop(volatile, None)
    return _digest(json.dumps(cfg, sort_keys=True, default=str).encode())


def weights_hash(model: nn.Module) -> str:
    """sha256 over every byte of every tensor of the model's state (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def weights_identity(loaded: LoadedModel) -> str:
    """What ties an index to a model's weights: the bytes of its folder's safetensors files when it
    was loaded from (or saved to) one, hashed once and cached by path, size and mtime; else every
    byte of the weights in memory. A merged adapter is identified apart (the adapter's own hash)."""
    folder = Path(loaded.weights_source) if loaded.weights_source else None
    files = sorted(folder.glob("*.safetensors")) if folder and folder.is_dir() else []
    if not files:
        return weights_hash(loaded.model)
    return _digest(*(f"{p.name}:{file_digest(p)};".encode() for p in files))


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, remembered in $REPT_CACHE by path + size + mtime so that a large
    model is read once, not at every `rept trace`."""
    from rept.demo import default_cache
    from rept.store.safefile import sha256_file

    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache = default_cache() / "file-digests.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    digest = sha256_file(path)
    known = {k: v for k, v in known.items() if not k.startswith(f"{path}|")}  # forget the file's old states
    known[key] = digest
    try:
        from rept.store.index import atomic_write_bytes

        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache, json.dumps(known, indent=0).encode())
    except OSError:  # a read-only cache only costs the hash next time
        pass
    return digest


def adapter_identity(adapter: str | None) -> str | None:
    """sha256 over every byte of the adapter's files (adapter_config.json, the adapter weights)."""
    if not adapter:
        return None
    files = sorted(p for p in Path(adapter).iterdir() if p.name.startswith("adapter_"))
    return _digest(*(f"{p.name}:{file_digest(p)};".encode() for p in files))


def tokenizer_hash(tokenizer) -> str:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    # Truncation and padding are call-time settings the backend remembers, not part of the tokenizer.
    backend.pop("truncation", None)
    backend.pop("padding", None)
    return _digest(json.dumps(backend, sort_keys=True).encode(),
                   str(getattr(tokenizer, "chat_template", None) or "").encode())


# ---------------------------------------------------------------- tiny models for demo and tests

SPECIAL_TOKENS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}


def train_tokenizer(texts, vocab_size: int = 2000):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a fast HF tokenizer with
    <s> prepended to every sequence (as Llama tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=SPECIAL_TOKENS["eos"],
                                   pad_token=SPECIAL_TOKENS["pad"], unk_token=SPECIAL_TOKENS["unk"])


def tiny_llama(tokenizer, hidden: int = 128, layers: int = 2, heads: int = 4, intermediate: int | None = None,
               max_positions: int = 512, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_gpt2(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 512, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=heads,
                        n_positions=max_positions, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)
