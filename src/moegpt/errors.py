"""Errors that are the user's to fix: the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input (a config value, a file, a flag). The message names what is at fault."""


class ConfigError(UserError):
    """An invalid configuration value; the message names the dotted field and the reason."""
