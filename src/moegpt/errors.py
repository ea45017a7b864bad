"""Errors that are the user's to fix: the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input (a config value, a file, a flag). The message names what is at fault."""


class ConfigError(UserError):
    """An invalid configuration value; the message names the dotted field and the reason."""


class TrainingStopped(Exception):
    """A training run stopped by a signal after saving its last step: the message says where
    it resumes; ``status`` is the exit status that says which signal (128 + its number)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
