"""promoe-ds: train ProMoE diffusion transformers on DeepSpeed."""
__version__ = "0.1.0"


def load_pretrained(path, device="cpu"):
    """The model of a ``promoe-ds export`` safetensors file, rebuilt from its metadata (see export.py)."""
    from promoe_ds.export import load_pretrained as _load

    return _load(path, device)
