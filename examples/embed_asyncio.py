"""Embed an echo server in a plain asyncio program, talk to it, read its counters.

Run it: `python examples/embed_asyncio.py`. It starts a server on 127.0.0.1 and a free port,
echoes one message through it, prints the server's stats and exits.
"""

from __future__ import annotations

import asyncio

from echo_async import EchoServer, ServerConfig


async def echo(host: str, port: int, payload: bytes) -> bytes:
    """Send `payload`, close our sending side, and read everything back until EOF."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def main() -> None:
    # Port 0: the OS picks a free port; server.port says which one it picked.
    config = ServerConfig(host="127.0.0.1", port=0, shutdown_timeout=5)
    async with EchoServer(config) as server:
        print(f"listening on {', '.join(server.addresses)}")
        answer = await echo(server.host, server.port, b"hello, echo")
        print(f"echoed: {answer.decode()}")
        stats = server.stats
        print(
            f"stats: connections_total={stats.connections_total} "
            f"bytes_in={stats.bytes_in} bytes_out={stats.bytes_out}"
        )
    # Leaving the block closed the server gracefully (await server.close() does it explicitly).
    print("closed")


if __name__ == "__main__":
    asyncio.run(main())
