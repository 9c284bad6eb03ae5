"""A collection run: plan, accumulate, shards, write, merge, distributed, diagnostics and the on-disk layout."""
