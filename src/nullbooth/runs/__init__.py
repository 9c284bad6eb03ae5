"""A collection run: identity, plan, accumulate, shards, write, collect, merge, distributed, diagnostics and the
on-disk layout."""
