"""The one exception type for user mistakes (the CLI prints it as one line and exits with code 2), and the integer
checks that raise it from the API, configs and tokenizer files alike."""


class LcdError(Exception):
    """Bad input: the message names the file, key or argument, the value seen and what is allowed."""


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def whole(name: str, value, low: int) -> int:
    """`value` if it is an int >= low, else an LcdError naming the argument."""
    if not is_int(value) or value < low:
        raise LcdError(f"{name}: {value!r} must be an integer >= {low}")
    return value


def token_ids(name: str, value) -> list[int]:
    """A config's token id or list of them (None: none) as a list, else an LcdError naming the key."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(is_int(i) for i in ids):
        raise LcdError(f"{name} {value!r} is not a token id or a list of them")
    return ids
