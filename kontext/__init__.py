"""FLUX.1 Kontext LoRA training machinery, by role: ``runtime`` (the model), ``training`` (the run's
infrastructure), ``tools`` (inference, evaluation, export) and ``tiny`` (the embedded tiny model)."""
