"""Command-line entry points: ``taskman`` (client.py, with messages.py) and
``taskman-server`` (server.py, with settings.py and check.py), docopt mains
behind the tiny scripts in bin/."""
