"""The one exception type users see: a problem with their input, said in one line."""


class EfficientADError(ValueError):
    """Bad input (missing folder, unreadable image, incompatible model file, ...).

    The CLI prints its message as a one-line error; the Python API lets it propagate. It derives
    from ``ValueError`` so that callers who validate arguments the scikit-learn way can catch that.
    """


def check_count(name: str, value: object, minimum: int = 1) -> None:
    """Refuse anything but an ``int`` of at least ``minimum`` (``True`` is an int to Python, not to a user)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EfficientADError(f"{name} must be an integer >= {minimum}, got {value!r}")


def first_line(error: BaseException) -> str:
    """The first line of a third-party error's message, or its type when the message is empty.

    torch's refusal to unpickle code comes with advice to load the file unsafely; that advice is
    never passed on.
    """
    text = str(error).strip()
    if text.startswith("Weights only load failed"):
        return "it holds pickled objects other than tensors, which are never loaded (they could run code)"
    lines = text.splitlines()
    return lines[0] if lines else type(error).__name__
