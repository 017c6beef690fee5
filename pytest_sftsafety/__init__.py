"""pytest-sftsafety: gate fine-tuned LLM releases on SORRY-Bench refusal rates."""

__version__ = "0.1.0"
