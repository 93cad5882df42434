"""Data: the grain pipeline (JSONL / text / ArrayRecord, packing) and the embedded corpus."""
