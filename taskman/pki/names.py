"""The PKI's file names, lifetimes and the one rule for user names.

A name is checked with ``NAME_PATTERN`` twice: when a certificate is issued
(``check_name``) and when a peer presents one (taskman.pki.identity).
"""

import datetime
import re
from typing import Optional

from taskman.errors import InvalidArgument

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_CRL = "ca.crl"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
ISSUED = "issued"
LOCK = ".lock"
RESERVED_NAMES = ("ca", "server")
DEFAULT_CLIENTS = ("client001", "client002", "admin")

KEY_SIZE = 4096
CA_DAYS = 3650
SERVER_DAYS = 30
CLIENT_DAYS = 7
# Renew once two thirds of a certificate's lifetime have passed: a 7-day
# certificate is replaced with more than two days to spare.
RENEW_AFTER = 2 / 3
# Accept a little clock skew between the host and its clients.
BACKDATE = datetime.timedelta(minutes=5)

# A user name: lower-case ASCII letters and digits, then also '.', '_' and
# '-', 1 to 64 characters. No upper case, spaces, control or non-ASCII
# characters, so that no name can pass for another one ("ADMIN", "admin ",
# a Cyrillic "аdmin") in logs and listings.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
NAME_RULE = ("lower-case ASCII letters, digits, '.', '_' and '-', starting with a letter "
             "or digit, at most 64 characters")
# Distinct peer certificates remembered by PeerCheck; beyond, it starts over.
PEER_CACHE_SIZE = 4096


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# -- names

def name_problem(name: str) -> Optional[str]:
    """Why ``name`` is not a valid user name, as a sentence; None if it is."""
    shown = ascii(name)
    if NAME_PATTERN.fullmatch(name):
        return None
    if not name:
        return "the common name is empty"
    if len(name) > 64:
        return f"the common name {shown[:40]}... is longer than 64 characters"
    if not name.isascii():
        return (f"the common name {shown} has non-ASCII characters, which can look like "
                "other names; names are " + NAME_RULE)
    if any(character.isspace() or not character.isprintable() for character in name):
        return f"the common name {shown} has spaces or control characters; names are " + NAME_RULE
    if name != name.lower():
        return f"the common name {shown} has upper-case letters; names are " + NAME_RULE
    return f"the common name {shown} is not a valid name; names are " + NAME_RULE


def check_name(name: str) -> str:
    """Return ``name`` if it can be issued a certificate; InvalidArgument if not."""
    problem = name_problem(name)
    if problem:
        raise InvalidArgument(problem)
    if name in RESERVED_NAMES:
        raise InvalidArgument(f"{name!r} is reserved for the PKI's own files")
    return name


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
