"""User-facing errors: one clear line naming the file, key or value and what to do."""


class PeftbenchError(RuntimeError):
    """An error caused by the user's input or environment; printed as one line, without a traceback."""


class ConfigError(PeftbenchError, ValueError):
    """A config value out of its domain (a rank, a budget, a batch size...): the message names the key and the fix."""


def check_range(name: str, value: object, low: float, high: float | None = None, *, integer: bool = False,
                high_open: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``low <= value <= high`` (``< high`` with ``high_open``; an int if asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (not integer or float(value).is_integer())
    if ok:
        ok = value >= low and (high is None or (value < high if high_open else value <= high))
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{name}={value!r}: expected {kind} {bound}")


class DataError(PeftbenchError):
    """Missing or malformed data (folder, split file, label, image)."""


class WeightsError(PeftbenchError):
    """Pre-trained weights that cannot be found, downloaded or safely loaded."""


class TrainingDiverged(PeftbenchError):
    """The loss became NaN or infinite."""


def user_error(err: BaseException) -> PeftbenchError | None:
    """The :class:`PeftbenchError` behind ``err`` (Hydra's instantiate wraps exceptions), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, PeftbenchError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
