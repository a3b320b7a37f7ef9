"""The fair-sharing paces as server options (--call-rate, --send-rate): their
defaults in the usage text are the library's, they reach Settings, and a bad
value is refused naming the option."""

import docopt
import pytest

from taskman import turns
from taskman.cli.server import usage
from taskman.cli.settings import Settings
from taskman.errors import ConfigError


def settings(*argv):
    return Settings(docopt.docopt(usage(), argv=list(argv), default_help=False))


def test_defaults_are_the_library_paces():
    text = usage()
    assert f"[default: {turns.CALL_RATE:g}]" in text.split("--call-rate <n>")[1].split("--")[0]
    assert f"[default: {turns.SEND_RATE:g}]" in text.split("--send-rate <n>")[1].split("--")[0]
    chosen = settings()
    assert (chosen.call_rate, chosen.send_rate) == (turns.CALL_RATE, turns.SEND_RATE)


def test_options_reach_settings_and_zero_turns_a_pace_off():
    chosen = settings("--call-rate", "0", "--send-rate", "12.5")
    assert (chosen.call_rate, chosen.send_rate) == (0.0, 12.5)


@pytest.mark.parametrize("option, value", [("--call-rate", "-1"), ("--send-rate", "fast"),
                                           ("--call-rate", "1e9")])
def test_bad_values_name_the_option(option, value):
    with pytest.raises(ConfigError, match=f"{option} must be 0"):
        settings(option, value)
