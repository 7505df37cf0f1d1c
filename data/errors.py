class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message says what was expected."""


def user_message(error: Exception) -> str:
    """The one-sentence message of an error, also when a DataLoader worker raised it (its text then carries
    the worker's traceback, whose last line is the original message)."""
    text = str(error)
    if 'Original Traceback' in text:
        text = text.strip().splitlines()[-1].split(': ', 1)[-1]
    return text
