"""mmserve: shared pieces of the three services (model config, local supervisor)."""
