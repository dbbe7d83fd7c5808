"""Building blocks of the models: each parameter knows how to load its shard."""
