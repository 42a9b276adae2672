"""rayllm: an LLM runtime on Ray, from raw text to an autoscaled endpoint."""

__version__ = "0.1.0"
