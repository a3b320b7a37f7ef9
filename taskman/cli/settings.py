"""taskman-server's command line as checked values (``Settings``).

Standard library and taskman's core only: parsing runs before grpc and
gevent may be imported (see taskman.cli.server), and ``--check`` never
imports them at all. A value that cannot be used raises ConfigError naming
the option (the limits' InvalidArgument comes from taskman.cgroups.Limits).
"""

import dataclasses
import logging
import os
import re

from taskman.cgroups import Limits, slices
from taskman.defaults import DEFAULT_ADDRESS
from taskman.errors import ConfigError, InvalidArgument
from taskman.pki.names import name_problem
from taskman.quotas import QuotaLimits
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
        self.max_health_streams = count(options["--max-health-streams"],
                                        "--max-health-streams", minimum=1)
        self.quotas = quota_limits(options)
        self.call_rate = rate(options["--call-rate"], "--call-rate")
        self.send_rate = rate(options["--send-rate"], "--send-rate")
        self.slice_limits = slice_limits(options)
        self.task_output_max = parse_size(options["--task-output-max"], "--task-output-max")
        self.retention = parse_duration(options["--retention"], "--retention")
        self.output_budget = parse_size(options["--output-budget"], "--output-budget")
        level = options["--log-level"].upper()
        if level not in LOG_LEVELS:
            raise ConfigError(f"unknown log level {options['--log-level']!r}")
        self.log_level = getattr(logging, level)
        self.check = bool(options["--check"])
        self.fleet = fleet_options(options)  # None: a standalone server
        self.audit_log = options["--audit-log"]
        self.metrics_address = options["--metrics-address"]
        if self.metrics_address:
            self.metrics_host, self.metrics_port = split_address(self.metrics_address,
                                                                 "--metrics-address")

    def audit_path(self, state_dir: str) -> str:
        """--audit-log, else audit.log in ``state_dir``."""
        return self.audit_log or os.path.join(state_dir, AUDIT_LOG)


# QuotaLimits fields given as sizes (512K, 4G); the others are counts.
SIZE_QUOTAS = ("argument_bytes", "output_bytes")


def quota_limits(options: dict) -> QuotaLimits:
    """The --quota-* options as QuotaLimits (0: no limit)."""
    values = {}
    for field in dataclasses.fields(QuotaLimits):
        option = "--quota-" + field.name.replace("_", "-")
        value = options[option]
        values[field.name] = (parse_size(value, option) if field.name in SIZE_QUOTAS
                              else count(value, option))
    return QuotaLimits(**values)


# Slice options: --user-<field> and --root-<field> for each of these Limits fields.
SLICE_FIELDS = ("cpu_quota_us", "cpu_period_us", "memory_max", "io_read_bps", "io_write_bps",
                "pids_max")


def slice_limits(options: dict) -> slices.SliceLimits:
    """--user-* and --root-* over the defaults computed from this machine
    (``slices.default_slice_limits``); an option left out keeps its default."""
    defaults = slices.default_slice_limits()
    root = _slice_side(options, "root", defaults.root)
    user = defaults.user
    if root.memory_max:  # each user's default is half the root's, as given
        user = dataclasses.replace(user, memory_max=root.memory_max // 2 >> 20 << 20)
    if root.pids_max:
        user = dataclasses.replace(user, pids_max=min(root.pids_max // 2, slices.USER_PIDS_MAX))
    weight = options.get("--tasks-cpu-weight")
    weight = slices.TASKS_CPU_WEIGHT if weight is None else integer(weight, "--tasks-cpu-weight")
    try:
        return slices.SliceLimits(user=_slice_side(options, "user", user), root=root,
                                  cpu_weight=weight)
    except InvalidArgument as error:
        raise ConfigError(str(error)) from None


def _slice_side(options: dict, side: str, default: Limits) -> Limits:
    given = {}
    for field in SLICE_FIELDS:
        option = f"--{side}-" + field.replace("_", "-")
        value = options.get(option)
        if value is not None:
            given[field] = (parse_size(value, option) if field == "memory_max"
                            else integer(value, option))
    try:
        return dataclasses.replace(default, **given)
    except InvalidArgument as error:  # names --memory-max...: name the option typed
        raise ConfigError(str(error).replace("--", f"--{side}-", 1)) from None


def fleet_options(options: dict):
    """--fleet and its companions as taskman.fleet.options.FleetOptions, or
    None. The fleet package is imported only when a fleet option is given."""
    if not any(options.get(name) for name in ("--fleet", "--node", "--fleet-ca",
                                               "--fleet-cert", "--fleet-key")):
        return None
    from taskman.fleet.options import FleetOptions

    return FleetOptions.from_command_line(options)


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


def rate(value: str, option: str) -> float:
    """A pace, per second: 0 (none) up to a million."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number <= 1_000_000:
        raise ConfigError(f"{option} must be 0 (no pace) to 1000000 a second, not {value!r}")
    return number


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
