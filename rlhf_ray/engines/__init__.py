"""Training engines (DeepSpeed / torch) and sampling."""
