"""promoe-ds: train ProMoE diffusion transformers on DeepSpeed."""
__version__ = "0.1.0"
