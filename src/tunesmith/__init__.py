"""tunesmith: fine-tune pretrained PyTorch models — full, partial, heads, LoRA and adapters."""
__version__ = "0.1.0"

import logging as _logging

# transformers imports torchao whenever it is installed (the `quantize` extra), and on a CPU that import logs a
# "Failed to load ..._C.so" per CUDA kernel library and torch's notes on torchao's enums: noise on every run.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "is an Enum subclass and is now natively supported" not in str(record.msg))
