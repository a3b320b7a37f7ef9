"""Command-line entry points: ``taskman`` (client.py) and ``taskman-server``
(server.py), docopt mains behind the tiny scripts in bin/."""
