"""Error types that decide how the CLI exits.

`UserError` is bad input (a path, key or value the user can fix): the CLI prints its one-line
message and exits 2 without a traceback. Anything else is an infrastructure failure and exits
non-zero with a traceback, so an orchestrator may retry it.

`redact` keeps credentials out of every message, tag and parameter: it sits here, at the bottom of
the package, so storage, tracking and tuning all use the same one.
"""

import re


class UserError(Exception):
    """Bad input; the message is one line naming the file, key or value and what was expected."""


class InfraError(Exception):
    """An infrastructure failure already explained in one line (a cluster that cannot be reached, a
    rollout that timed out): the CLI prints the message without a traceback and exits 1."""


# --- credentials never reach a message -------------------------------------------------------------

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pwd|token|access_token|secret|client_secret|api_key|apikey|key|sig|signature"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&;\s]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with URL credentials (`user:pass@`) and secret query values replaced by `***`."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _SECRET_QUERY.sub(r"\g<key>***", text)
