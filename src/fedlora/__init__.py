"""fedlora: federated fine-tuning of transformers with LoRA adapters, aggregated exactly and fast."""

__version__ = "0.1.0"
