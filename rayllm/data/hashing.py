"""Content hashing for exact dedup."""

import hashlib


def content_hash(text: str) -> str:
    """Hash of the document with case and whitespace folded: equal hashes are exact duplicates."""
    folded = " ".join(text.lower().split())
    return hashlib.blake2b(folded.encode(), digest_size=16).hexdigest()
