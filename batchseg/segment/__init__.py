"""The segmentation job: settings and checks, one shard end to end, and the Ray driver (the only part
that imports Ray)."""
