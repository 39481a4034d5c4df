"""The store: the on-disk index (layout, manifest, checksums), its resumable sharded writer, a
baseline method's index, and the safe-file primitives both use."""
