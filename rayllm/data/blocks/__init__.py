"""The per-document curation blocks: normalise, language ID, quality filters, the learned
classifier, PII scrubbing. Each is a small class with its own config; ``base.Block`` carries
what they share."""
