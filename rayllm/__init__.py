"""rayllm: an LLM runtime on Ray, from raw text to an autoscaled endpoint."""
