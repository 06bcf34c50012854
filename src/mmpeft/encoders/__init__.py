"""Encoder families; each module registers itself (imported on first registry lookup)."""
