"""plait: train and fine-tune multimodal mixture-of-experts language models with multi-token prediction."""

from plait.models import from_config, from_pretrained

__version__ = "0.1.0"
__all__ = ["from_config", "from_pretrained", "__version__"]
