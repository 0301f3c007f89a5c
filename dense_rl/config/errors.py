"""The two errors a user sees as one line: bad input before anything starts, and a run that cannot
go on. Each message names the field or the component and says what to do."""


class ConfigError(ValueError):
    """A bad configuration value. The message names the field and says how to fix it."""


class RunFailed(RuntimeError):
    """The run cannot go on; the message is one line naming what failed and why."""
