"""The prompt/response boundary and truncation."""

from rept.data.examples import format_pair, format_prompt, tokenize_pair


def test_plain_boundary_matches_prompt_tokens(tokenizer):
    ex = tokenize_pair(tokenizer, "Name a color.", "Blue is a color.", max_length=64)
    prompt_text = format_prompt(tokenizer, "Name a color.")
    assert ex.input_ids[0] == tokenizer.bos_token_id
    # every prompt token starts inside the prompt text; every response token after it
    assert all(start < len(prompt_text) for start, _ in ex.offsets[1: ex.prompt_len])
    assert all(start >= len(prompt_text) for start, _ in ex.offsets[ex.prompt_len:])
    # the response (with EOS) decodes back from the response tokens
    decoded = tokenizer.decode(ex.input_ids[ex.prompt_len:])
    assert decoded == "Blue is a color." + tokenizer.eos_token


def test_chat_template_response_includes_end_of_turn(chat_tokenizer):
    full, prompt_chars = format_pair(chat_tokenizer, "Hi there", "Hello!")
    assert full[:prompt_chars].endswith("<|assistant|>\n")
    ex = tokenize_pair(chat_tokenizer, "Hi there", "Hello!", max_length=64)
    response = chat_tokenizer.decode(ex.input_ids[ex.prompt_len:])
    assert response.startswith("Hello!") and "</s>" in response
    # the template writes BOS itself: it is not doubled
    assert ex.input_ids[:2].count(chat_tokenizer.bos_token_id) == 1


def test_boundary_comes_from_whole_text_not_prompt_alone(tokenizer):
    # Whatever the tokenizer merges across the boundary, ids are those of the whole text.
    ex = tokenize_pair(tokenizer, "Say", "yes", max_length=64)
    text, _ = format_pair(tokenizer, "Say", "yes")
    assert ex.input_ids == tokenizer(text)["input_ids"]


def test_response_cut_off_is_none(tokenizer):
    long_prompt = "word " * 200
    assert tokenize_pair(tokenizer, long_prompt, "answer", max_length=32) is None
    ex = tokenize_pair(tokenizer, "short", "a long answer " * 50, max_length=32)
    assert len(ex.input_ids) == 32 and ex.n_response > 0
