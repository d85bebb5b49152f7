"""The error bit-finetune reports as a message (not a traceback): input that cannot be fine-tuned on."""


class FinetuneInputError(ValueError):
    """Bad input (arguments, data, model), found before training starts; the message says what was expected."""
