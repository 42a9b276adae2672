"""rayllm: an LLM runtime on Ray, from raw text to an autoscaled endpoint."""

import logging as _logging

__version__ = "0.1.0"


def _warnings_only_as_errors(record: _logging.LogRecord) -> bool:
    return record.levelno >= _logging.ERROR


# torchao (installed for QLoRA's 4-bit base) is imported by transformers, peft and vLLM in
# every process that loads a model, and at import it warns that its CUDA kernels and Triton
# do not load, and it registers two enums with torch's pytree, which warns too: a dozen
# lines in every stage's output on a CPU. Here, where every rayllm process starts, only their
# errors are kept. (torch.utils._pytree gets a filter, not a level: torch resets the levels
# of its own loggers when its logging starts.)
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").addFilter(_warnings_only_as_errors)
