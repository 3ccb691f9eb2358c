"""User tools around a trained LoRA: inference, evaluation and metrics, plots, the ComfyUI export, the model card."""
