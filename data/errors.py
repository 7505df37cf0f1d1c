class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message says what was expected."""
