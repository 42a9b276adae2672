"""Document filters: each a small block with its own config, answering keep or (drop, reason)."""
