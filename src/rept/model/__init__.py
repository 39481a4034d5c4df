"""The model: loading (HF folders, adapters, GGUF), training (from scratch, LoRA), greedy answers."""
