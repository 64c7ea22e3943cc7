"""Offline model and data builders (tiny test model, SmolLM2 demo model)."""
