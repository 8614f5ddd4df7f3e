"""Verify: evidence beyond completions — tool checks (math and agent), LLM judges — and scoring it against references."""
