"""The one exception type for bad user input; the CLI turns it into a one-line error."""


class UserError(Exception):
    """Input the user can fix: the message says what is wrong and what to do."""
