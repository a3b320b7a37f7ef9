"""ListTasks page tokens: opaque, and bound to the caller who was given one.

A token is base64url(HMAC-SHA256(secret, caller NUL task id)[:16] + task id)
with a secret drawn at random per server process. So a token names a task
only to the server that made it, for the caller it was made for; anything
else (another caller's token, a forged or bare task id, garbage, a token
from before a restart) is refused with one sentence, ``INVALID_TOKEN``, the
same one whether or not the task exists: paging is no existence oracle.
"""

import base64
import binascii
import hashlib
import hmac
import secrets

from taskman.errors import InvalidArgument

MAC_BYTES = 16
MAX_TOKEN_CHARS = 256  # a task id is 36 characters; anything much longer is garbage
INVALID_TOKEN = "invalid page token: list again from the first page"


class PageTokens:
    """Makes and reads the page tokens of one server process."""

    def __init__(self, secret: bytes = b""):
        self._secret = secret or secrets.token_bytes(32)

    def make(self, caller: str, task_id: str) -> str:
        mac = self._mac(caller, task_id)
        return base64.urlsafe_b64encode(mac + task_id.encode("ascii")).decode("ascii")

    def read(self, caller: str, token: str) -> str:
        """The task id ``token`` continues after; InvalidArgument(INVALID_TOKEN)
        unless this server made it for ``caller``."""
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidArgument(INVALID_TOKEN)
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
            task_id = raw[MAC_BYTES:].decode("ascii")
        except (ValueError, binascii.Error, UnicodeError):
            raise InvalidArgument(INVALID_TOKEN) from None
        if len(raw) <= MAC_BYTES or not hmac.compare_digest(raw[:MAC_BYTES],
                                                            self._mac(caller, task_id)):
            raise InvalidArgument(INVALID_TOKEN)
        return task_id

    def _mac(self, caller: str, task_id: str) -> bytes:
        message = caller.encode("utf-8", "surrogatepass") + b"\0" + task_id.encode("ascii")
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:MAC_BYTES]
