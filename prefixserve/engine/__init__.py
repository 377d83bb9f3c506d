"""Request state, scheduling, KV pages, adapter residency, the model runner and the engine loops."""
