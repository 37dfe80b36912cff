"""Prompt construction: chat templates per model family and placeholder expansion."""
