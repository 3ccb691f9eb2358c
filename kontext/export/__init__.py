"""What a finished run hands on: the ComfyUI (BFL / kohya) LoRA file and the model card.

A library: the trainer writes both at the end of a run; ``python -m kontext.tools.comfyui`` converts a file later.
"""
