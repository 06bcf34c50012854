"""Methods; each module registers itself (imported on first registry lookup)."""
