"""ipg-sae: explain and control LLM reasoning through SAE features with Integrated Policy Gradient."""

__version__ = "0.1.0"
