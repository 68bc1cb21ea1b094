"""A ready locustfile: Locust users that echo to an echo server and check every byte.

Needs ``pip install 'echo-async[locust]'``. With a server running (``echo-async serve``)::

    locust -f examples/locustfile.py

and open http://localhost:8089: the host and the --echo-* options are in the start form. Or
without the browser, writing Locust's CSV files::

    locust -f examples/locustfile.py --headless --users 50 --spawn-rate 50 --run-time 30s \\
        --host tcp://127.0.0.1:12000 --echo-mode pingpong --echo-size 1KiB --csv echo

A master and workers on several hosts: docs/load-testing.md, "Beyond one machine: Locust".
This file is loaded by ``locust``, not run by ``python``.
"""

from echo_async.locust import EchoUser


class EchoServerUser(EchoUser):
    """One user: ``--echo-size`` bytes echoed back to back (pingpong) or a connection per echo
    (oneshot), against ``--host`` (the default is ``echo-async serve``'s own address).
    """

    host = "tcp://127.0.0.1:12000"
