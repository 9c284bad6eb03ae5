"""Evaluation: base vs personalised on the same prompts and seeds; distribution metrics."""
