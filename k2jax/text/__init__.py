"""Text: the K2 tiktoken tokenizer, its chat template, and a small BPE trainer."""
