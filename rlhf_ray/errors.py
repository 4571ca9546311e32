"""Errors a user can fix: printed by the CLI as one paragraph, without a traceback."""


class UserError(Exception):
    """Bad config, data or resources; the message names what is wrong."""
