"""Review: human review of step labels (pure parts; the Label Studio client lives in flows/review.py)."""
