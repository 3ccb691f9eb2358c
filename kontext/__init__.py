"""FLUX.1 Kontext LoRA training machinery, by role: ``runtime`` (the model), ``training`` (the run's
infrastructure), ``tools`` (inference, evaluation, export) and ``tiny`` (the embedded tiny model)."""

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
