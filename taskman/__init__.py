"""taskman: run commands as supervised tasks, each in its own cgroup.

The library (this package minus ``service``, ``tls``, ``client`` and ``cli``)
knows nothing of gRPC: ``TaskManager`` in ``taskman.manager`` is the API.
"""

__version__ = "0.1.0"
