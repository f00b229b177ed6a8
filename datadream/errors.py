"""Error types that decide how the CLI exits.

`UserError` is bad input (a path, key or value the user can fix): the CLI prints its one-line
message and exits 2 without a traceback. Anything else is an infrastructure failure and exits
non-zero with a traceback, so an orchestrator may retry it.
"""


class UserError(Exception):
    """Bad input; the message is one line naming the file, key or value and what was expected."""


class InfraError(Exception):
    """An infrastructure failure already explained in one line (a cluster that cannot be reached, a
    rollout that timed out): the CLI prints the message without a traceback and exits 1."""
