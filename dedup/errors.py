"""The error bit-dedup reports as a message (not a traceback): input it cannot work on."""

from finetune.errors import FinetuneInputError


class DedupInputError(FinetuneInputError):
    """Bad input (arguments, image sources, model), found before the search starts; the message says what was
    expected. A `FinetuneInputError`, so the fine-tuning layer's own checks (models, label columns) read the same."""
