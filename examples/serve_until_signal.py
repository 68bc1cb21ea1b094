"""An application that owns its signals and runs an echo server until SIGTERM or SIGINT.

The library never installs signal handlers; the application does, then asks the server to drain.
Run it: `python examples/serve_until_signal.py [PORT]`. So that it ends by itself as an example,
it sends itself SIGTERM after one round trip; delete `demonstrate_and_stop` in a real program.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from echo_async import EchoServer, ServerConfig


async def demonstrate_and_stop(server: EchoServer) -> None:
    """One round trip through the server, then SIGTERM to ourselves, as `kill` would send."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"ping\n")
    print(f"echoed: {(await reader.readline()).decode().strip()}")
    writer.close()
    await writer.wait_closed()
    os.kill(os.getpid(), signal.SIGTERM)


async def main(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = EchoServer(ServerConfig(host="127.0.0.1", port=port, shutdown_timeout=5))
    await server.start()
    print(f"listening on {', '.join(server.addresses)}")
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(server.serve_forever())
        tasks.create_task(demonstrate_and_stop(server))
        await stop.wait()
        print("signal received, draining")
        # Open connections get what they sent echoed back, then EOF; serve_forever() returns.
        await server.close()
    print(f"closed after {server.stats.connections_total} connection(s)")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
