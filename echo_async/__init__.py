"""echo-async: an RFC 862 echo service on asyncio and uvloop.

The public API: `EchoServer` runs a server on the current event loop from a `ServerConfig`;
`Stats` is a snapshot of its counters; `ServerMetrics` keeps Prometheus collectors on a registry
you own up to date; `ConfigError` names an invalid option.
"""

from echo_async.config import ConfigError, ServerConfig
from echo_async.metrics import ServerMetrics
from echo_async.server import EchoServer, Stats

__version__ = "0.1.0"

__all__ = ["ConfigError", "EchoServer", "ServerConfig", "ServerMetrics", "Stats", "__version__"]
