"""The server's command line, parsed once per usage text and argv.

docopt takes 70-80 ms to parse taskman-server's usage (its pattern fix-up
compares every option with every other by ``repr``), and a reload's
``--check`` and new image, which run with the old image's very arguments,
would each pay it again between the SIGHUP and the first answer (the new
image inside the window where calls are refused; docs/design.md, "Reload").
So the server passes its parse on in the environment, keyed by a digest of
its usage text and argv: a child uses it only if its own usage text (which
carries every option and default) and argv give the same digest, and parses
for itself otherwise, as after an upgrade that changed an option.
"""

import hashlib
import json
import os
from typing import List, Optional

VARIABLE = "TASKMAN_PARSED_OPTIONS"


def key(text: str, argv: List[str]) -> str:
    """The digest a parse of ``argv`` by usage ``text`` is kept under."""
    return hashlib.sha256(json.dumps([text, list(argv)]).encode()).hexdigest()


def handed_over(text: str, argv: List[str]) -> Optional[dict]:
    """The options the previous image parsed for this very usage text and
    argv, if it passed them; removed from the environment either way, so no
    task or later exec sees them."""
    passed = os.environ.pop(VARIABLE, None)
    if not passed:
        return None
    wanted = key(text, argv)
    try:
        for kept in json.loads(passed):
            if kept["key"] == wanted and isinstance(kept["options"], dict):
                return kept["options"]
    except (ValueError, KeyError, TypeError):
        pass
    return None


def pass_on(text: str, argv: List[str], options: dict) -> None:
    """Put ``options`` (docopt's parse of the serving ``argv``) in the
    environment for the reload's ``--check`` child and the image it execs.

    The check runs with ``--check`` before the same arguments: a flag, so
    docopt's parse of that argv is this one with ``--check`` true.
    """
    checking = dict(options, **{"--check": True})
    os.environ[VARIABLE] = json.dumps([
        {"key": key(text, argv), "options": dict(options)},
        {"key": key(text, ["--check", *argv]), "options": checking}])
