"""pg_tune: LoRA/QLoRA fine-tuning of PaliGemma and PaliGemma 2 from YAML recipes."""

__version__ = "0.1.0"
