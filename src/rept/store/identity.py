"""What ties a stored thing to the model and data it was computed from, as settings objects.

A signature index, a method index and a correction each record an identity. On disk it stays flat
fields of the manifest (or of the correction's settings), so files written before these classes
existed open unchanged; read back, it is the same object again, and two are compared field by
field. The fields compared are the fields of these classes: there is no key list to keep in sync.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# What each field means to a person reading a refusal.
READABLE = {"model_config_hash": "model config", "model_weights_hash": "model weights",
            "adapter_hash": "adapter", "tokenizer_hash": "tokenizer", "template": "chat template"}


@dataclass(frozen=True)
class ModelIdentity:
    """The model, adapter, tokenizer and chat template an output is tied to."""
    model_config_hash: str | None = None
    model_weights_hash: str | None = None
    adapter_hash: str | None = None
    tokenizer_hash: str | None = None
    template: str | None = None

    @classmethod
    def of(cls, loaded) -> "ModelIdentity":
        """The identity of a loaded model (rept.model.loading.LoadedModel)."""
        from rept.data.examples import template_name
        from rept.model.loading import adapter_identity, config_hash, tokenizer_hash, weights_identity

        return cls(config_hash(loaded.model), weights_identity(loaded), adapter_identity(loaded.adapter),
                   tokenizer_hash(loaded.tokenizer), template_name(loaded.tokenizer))


@dataclass(frozen=True)
class SignatureStoreIdentity:
    """What makes two RepT signature indexes (or a rerun and the index it resumes) incompatible."""
    model: ModelIdentity
    layer: int | None
    max_length: int | None
    dataset_fingerprint: str | None
    dtype: str | None
    shard_size: int | None
    stores_g_next: bool = False  # an index built for the lookahead mode holds a third vector per row


@dataclass(frozen=True)
class MethodStoreIdentity:
    """What makes two method indexes incompatible (a text method's model identity stays empty)."""
    method: str | None
    method_settings: dict | None
    model: ModelIdentity
    layer: int | None
    max_length: int | None
    dataset_fingerprint: str | None
    rows_fingerprint: str | None


def flat(identity) -> dict:
    """The identity as the flat fields a manifest records (a nested ModelIdentity inlined)."""
    out = {}
    for f in fields(identity):
        value = getattr(identity, f.name)
        out.update(flat(value) if isinstance(value, ModelIdentity) else {f.name: value})
    return out


def from_fields(cls, record: dict):
    """The identity `cls` read back from flat fields (a manifest, a correction's settings)."""
    values = {}
    for f in fields(cls):
        if f.name == "model":
            values["model"] = from_fields(ModelIdentity, record)
        elif f.name == "stores_g_next":
            values[f.name] = bool(record.get(f.name))  # absent in indexes built before the lookahead mode
        else:
            values[f.name] = record.get(f.name)
    return cls(**values)


def differences(have, want, have_as: str = "index", want_as: str = "this run") -> list[str]:
    """One 'field: <have_as> has X, <want_as> has Y' line per field in which two identities differ."""
    a, b = flat(have), flat(want)
    return [f"{k}: {have_as} has {a[k]!r}, {want_as} has {b[k]!r}" for k in b if a.get(k) != b[k]]


def differing_names(have: ModelIdentity, want: ModelIdentity) -> list[str]:
    """The readable names of the model-identity fields that differ ("adapter", "tokenizer", ...)."""
    a, b = flat(have), flat(want)
    return [READABLE.get(k, k) for k in b if a.get(k) != b[k]]
