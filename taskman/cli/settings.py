"""taskman-server's command line as checked values (``Settings``).

Standard library and taskman's core only: parsing runs before grpc and
gevent may be imported (see taskman.cli.server), and ``--check`` never
imports them at all. A value that cannot be used raises ConfigError naming
the option (the limits' InvalidArgument comes from taskman.cgroups.Limits).
"""

import logging
import os
import re

from taskman.cgroups import Limits
from taskman.defaults import DEFAULT_ADDRESS
from taskman.errors import ConfigError
from taskman.pki.names import name_problem
from taskman.users import parse_ids

ADMIN = "admin"  # the one built-in administrator; --admin names more

AUDIT_LOG = "audit.log"  # in the state directory, unless --audit-log says otherwise
DRIVERS = ("auto", "v2", "hybrid", "none")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Settings:
    """The parsed command line (docopt's dict); ConfigError for a value that cannot be used."""

    def __init__(self, options: dict):
        self.address = options["--server-address"] or DEFAULT_ADDRESS
        self.host, self.port = split_address(self.address)
        self.ca_cert = options["--ca-cert"]
        self.ca_key = options["--ca-key"]
        self.ca_dir = options["--ca-dir"]
        self.server_cert = options["--server-cert"]
        self.server_key = options["--server-key"]
        self.san = tuple(options["--san"])
        self.client_days = days(options["--client-days"], "--client-days")
        self.server_days = days(options["--server-days"], "--server-days")
        self.admins = (ADMIN,) + tuple(admin_name(name) for name in options["--admin"])
        self.state_dir = options["--state-dir"]
        self.driver = options["--cgroup-driver"]
        if self.driver not in DRIVERS:
            raise ConfigError(f"unknown cgroup driver {self.driver!r}: "
                              "use auto, v2, hybrid or none")
        self.cgroup_root = options["--cgroup-root"]
        self.user_map = options["--user-map"]
        self.uid_range = parse_ids(options["--uid-range"])
        # Limits checks the values with the kernel's rules (InvalidArgument
        # naming the option); here they only have to be integers.
        self.limits = Limits(
            cpu_quota_us=integer(options["--cpu-quota-us"], "--cpu-quota-us"),
            cpu_period_us=integer(options["--cpu-period-us"], "--cpu-period-us"),
            memory_max=parse_size(options["--memory-max"]),
            io_read_bps=integer(options["--io-read-bps"], "--io-read-bps"),
            io_write_bps=integer(options["--io-write-bps"], "--io-write-bps"),
            io_devices=tuple(parse_device(value) for value in options["--io-device"]),
            pids_max=integer(options["--pids-max"], "--pids-max"))
        try:
            self.stop_grace = float(options["--stop-grace"])
        except ValueError:
            self.stop_grace = -1.0
        if not 0 <= self.stop_grace <= 3600:
            raise ConfigError(f"--stop-grace must be 0 to 3600 seconds, "
                              f"not {options['--stop-grace']!r}")
        self.max_streams = count(options["--max-streams"], "--max-streams", minimum=1)
        self.task_output_max = parse_size(options["--task-output-max"], "--task-output-max")
        self.retention = parse_duration(options["--retention"], "--retention")
        self.output_budget = parse_size(options["--output-budget"], "--output-budget")
        level = options["--log-level"].upper()
        if level not in LOG_LEVELS:
            raise ConfigError(f"unknown log level {options['--log-level']!r}")
        self.log_level = getattr(logging, level)
        self.check = bool(options["--check"])
        self.audit_log = options["--audit-log"]
        self.metrics_address = options["--metrics-address"]
        if self.metrics_address:
            self.metrics_host, self.metrics_port = split_address(self.metrics_address,
                                                                 "--metrics-address")

    def audit_path(self, state_dir: str) -> str:
        """--audit-log, else audit.log in ``state_dir``."""
        return self.audit_log or os.path.join(state_dir, AUDIT_LOG)


def split_address(address: str, option: str = "--server-address"):
    """"host:port" or "[v6]:port" -> (host, port); ConfigError if malformed."""
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"invalid {option} {address!r}: expected host:port")
    return host, int(port)


def days(value: str, option: str) -> float:
    """A certificate lifetime in days: positive, at most ten years."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not 0 < number <= 3650:
        raise ConfigError(f"{option} must be a number of days above 0 and at most 3650, "
                          f"not {value!r}")
    return number


def admin_name(name: str) -> str:
    """An --admin name: one a certificate can carry (taskman.pki's rule)."""
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"--admin {ascii(name)}: {problem}")
    return name


def integer(value: str, option: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option} must be an integer, not {value!r}") from None


def count(value: str, option: str, minimum: int = 0) -> int:
    """A whole number of at least ``minimum``."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < minimum:
        raise ConfigError(f"{option} must be an integer of at least {minimum}, not {value!r}")
    return number


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def parse_size(value: str, option: str = "--memory-max") -> int:
    """"512M" -> 536870912; plain numbers are bytes (K, M, G, T: powers of 1024); 0: no limit."""
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise ConfigError(f"invalid {option} {value!r}: expected bytes or a size "
                          "such as 512M")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)


def parse_duration(value: str, option: str) -> float:
    """"7d" -> 604800.0; plain numbers are seconds; 0: forever."""
    match = _DURATION.fullmatch(value.strip())
    if not match:
        raise ConfigError(f"invalid {option} {value!r}: expected a duration such as 90s, "
                          "30m, 12h or 7d")
    return float(match.group(1)) * _SECONDS[match.group(2).lower()]


def parse_device(value: str) -> str:
    major, separator, minor = value.partition(":")
    if not (separator and major.isdigit() and minor.isdigit()):
        raise ConfigError(f"invalid --io-device {value!r}: expected MAJOR:MINOR such as 8:0")
    return f"{int(major)}:{int(minor)}"
