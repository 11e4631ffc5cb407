"""Errors that describe a user mistake; the CLI prints them without a traceback."""


class FgdataError(Exception):
    """Bad input or configuration: the message says what to fix."""


class StageFailed(FgdataError):
    """Some shards still failed after their retries; finished shards stay finished."""

    def __init__(self, stage: str, failures: dict[str, str]):
        self.failures = failures
        lines = [f"{stage}: {len(failures)} shard(s) failed after retries:"]
        lines += [f"  {name}: {error}" for name, error in sorted(failures.items())]
        lines.append("Finished shards are kept; rerun the same command to retry the rest.")
        super().__init__("\n".join(lines))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: what a one-line user error quotes of a library's."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def shown(value, limit: int = 80) -> str:
    """repr cut to `limit` characters: a user's value in a one-line message (repr escapes control
    characters, so a value never spans lines or drives the terminal)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
