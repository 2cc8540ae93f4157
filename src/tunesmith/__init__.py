"""tunesmith: fine-tune pretrained PyTorch models — full, partial, heads, LoRA and adapters."""
__version__ = "0.1.0"
