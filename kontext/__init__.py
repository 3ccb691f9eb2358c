"""FLUX.1 Kontext LoRA training machinery, by role, lowest layer first: ``errors`` (the one user-error base),
``runtime`` (the model) and ``evaluation`` (metrics, grids, plots), ``tiny`` (the embedded tiny model), ``export``
(the ComfyUI file, the model card), ``training`` (the run's infrastructure), and ``tools`` (the commands: inference,
evaluation, ComfyUI conversion). Each imports only the layers below it (``tests/test_import_layers.py``)."""

import logging


class _UnusedImageProcessorNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL version without torchvision.

    Importing ``FluxKontextPipeline`` imports the CLIP and SigLIP image processors of its optional IP-Adapter
    components, which this project never loads; without torchvision, transformers then prints two such notices
    on every command, and nothing in them concerns the user.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# The logger transformers' lazy module reports the fallback on (transformers.utils.import_utils).
logging.getLogger("transformers.utils.import_utils").addFilter(_UnusedImageProcessorNotice())
