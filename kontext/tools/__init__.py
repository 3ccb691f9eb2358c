"""The commands around a trained LoRA: ``infer``, ``evaluate`` and ``comfyui`` (each ``python -m kontext.tools.<name>``)."""
