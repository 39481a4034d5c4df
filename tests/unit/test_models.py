"""Models: PEFT adapters, layer addressing, identity hashes."""

import pytest
import torch

from rept.data.examples import tokenize_pair
from rept.model.loading import ModelError, load_model, resolve_layer, tokenizer_hash, weights_hash
from rept.signatures.extract import extract_all


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(path)
    return str(path)


def test_adapter_changes_signatures_and_merge_is_exact(model_dir, adapter_dir, rows):
    base = load_model(model_dir)
    merged = load_model(model_dir, adapter_dir)
    unmerged = load_model(model_dir, adapter_dir, merge_adapter=False)
    ex = [tokenize_pair(base.tokenizer, r["prompt"], r["response"], row=i, max_length=64) for i, r in enumerate(rows[:4])]
    pad = base.tokenizer.pad_token_id
    a, b, c = (extract_all(m.model, ex, 2, pad, batch_size=4) for m in (base, merged, unmerged))
    assert not torch.allclose(a.g, b.g)
    assert torch.allclose(b.h, c.h, rtol=1e-4, atol=1e-5) and torch.allclose(b.g, c.g, rtol=1e-4, atol=1e-6)
    assert weights_hash(base.model) != weights_hash(merged.model)
    assert all(not p.requires_grad for p in merged.model.parameters())


def test_layer_addressing(llama):
    assert resolve_layer(llama, -1) == 3 and resolve_layer(llama, 0) == 0 and resolve_layer(llama, -4) == 0
    with pytest.raises(ModelError, match="out of range"):
        resolve_layer(llama, 4)
    with pytest.raises(ModelError, match="out of range"):
        resolve_layer(llama, -5)


def test_tokenizer_hash_ignores_call_time_settings(tokenizer, chat_tokenizer):
    before = tokenizer_hash(tokenizer)
    tokenizer("some text", truncation=True, max_length=8)
    assert tokenizer_hash(tokenizer) == before
    assert tokenizer_hash(chat_tokenizer) != before  # the chat template is part of the identity


def test_adapter_folder_without_config(model_dir, tmp_path):
    with pytest.raises(ModelError, match="adapter_config.json"):
        load_model(model_dir, str(tmp_path))


def test_model_names_are_folders_or_hub_ids(tmp_path):
    """A name that is not on disk is a Hub id when it reads as one (downloaded or cached by
    transformers), and a missing folder otherwise: that one fails at once, naming the folder."""
    from rept.model.loading import check_model_source, is_hub_id

    assert is_hub_id("gpt2") and is_hub_id("Qwen/Qwen2.5-0.5B") and is_hub_id("meta-llama/Llama-2-7b-hf")
    for path in (str(tmp_path / "missing"), "./missing", "runs/bench/base", "a b/c"):
        assert not is_hub_id(path), path
    assert not is_hub_id(str(tmp_path))  # an existing folder is a folder
    check_model_source(str(tmp_path))
    with pytest.raises(ModelError, match="no such base model folder: ./missing"):
        check_model_source("./missing", "base model")
