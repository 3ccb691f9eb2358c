"""Model-specific machinery for FLUX.1 Kontext LoRA training: the tiny model builder, packing, LoRA, checkpoints, export."""
