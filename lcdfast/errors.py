"""The one exception type for user mistakes (the CLI prints it as one line and exits with code 2), and the value
checks that raise it from the API, configs and tokenizer files alike."""


class LcdError(Exception):
    """Bad input: the message names the file, key or argument, the value seen and what is allowed."""


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shown(value) -> str:
    """repr(value) cut to 60 characters, so a message stays one short line (ints past Python's digit limit too)."""
    try:
        text = repr(value)
    except ValueError:  # an int longer than sys.get_int_max_str_digits()
        text = f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= 60 else text[:56] + " ..."


def whole(name: str, value, low: int, high: int | None = None) -> int:
    """`value` if it is an int >= low (and <= high), else an LcdError naming the argument."""
    if not is_int(value) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise LcdError(f"{name}: {shown(value)} must be an integer {allowed}")
    return value


def number(name: str, value, low: float, high: float) -> float:
    """`value` as a float if it is a number in [low, high] (so neither NaN nor infinite), else an LcdError."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise LcdError(f"{name}: {shown(value)} must be a number in [{low:g}, {high:g}]")
    return float(value)


def flag(name: str, value) -> bool:
    """`value` if it is a bool (a JSON true or false, not any truthy value), else an LcdError."""
    if not isinstance(value, bool):
        raise LcdError(f"{name}: {shown(value)} must be true or false")
    return value


def token_ids(name: str, value) -> list[int]:
    """A config's token id or list of them (None: none) as a list, else an LcdError naming the key."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(is_int(i) for i in ids):
        raise LcdError(f"{name} {shown(value)} is not a token id or a list of them")
    return ids
