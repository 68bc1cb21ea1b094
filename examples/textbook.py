"""The textbook TCP echo server and client, and where they break; docs/from-the-textbook.md.

`python textbook.py` runs the server in a thread on a free port, talks to it as the textbook
client does, shows a multibyte character split across two reads breaking `.decode()`, and
exits. `python textbook.py --port 12001` serves forever, for `echo-async bench` to measure.
"""

from __future__ import annotations

import argparse
import threading
from socket import AF_INET, SO_REUSEADDR, SOCK_STREAM, SOL_SOCKET, socket


# --8<-- [start:server]
def serve(server: socket, clients: int | None = None) -> None:
    server.listen(1)
    served = 0
    while clients is None or served < clients:
        connection, _address = server.accept()  # one client at a time
        sentence = connection.recv(1024).decode()  # one read, taken as the whole message
        connection.send(sentence.encode())
        connection.close()
        served += 1


# --8<-- [end:server]


# --8<-- [start:client]
def ask(port: int, sentence: str) -> str:
    with socket(AF_INET, SOCK_STREAM) as client:
        client.connect(("127.0.0.1", port))
        client.sendall(sentence.encode())
        return client.recv(1024).decode()


# --8<-- [end:client]


# --8<-- [start:split]
def split_character() -> str:
    data = "café".encode()  # 5 bytes: 'é' is two of them, 0xC3 0xA9
    first, second = data[:4], data[4:]  # TCP may deliver them in two reads, split anywhere
    try:
        return first.decode() + second.decode()
    except UnicodeDecodeError as error:
        return f"UnicodeDecodeError: {error.reason}"


# --8<-- [end:split]


def serve_bytes(server: socket) -> None:
    """The same serial loop without `.decode()`: it survives binary clients, for measuring."""
    while True:
        connection, _address = server.accept()
        connection.send(connection.recv(1024))
        connection.close()


def bound_socket(port: int) -> socket:
    server = socket(AF_INET, SOCK_STREAM)
    server.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(1)  # here too, so a client never races serve()'s own listen()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, help="serve forever on 127.0.0.1:PORT")
    parser.add_argument("--bytes", action="store_true", help="with --port: never decode")
    arguments = parser.parse_args()
    if arguments.port is not None:
        with bound_socket(arguments.port) as server:
            serve_bytes(server) if arguments.bytes else serve(server)
        return
    with bound_socket(0) as server:
        port = server.getsockname()[1]
        thread = threading.Thread(target=serve, args=(server, 1))
        thread.start()
        print("echoed:", ask(port, "any sentence, any bytes"))
        thread.join()
    print("split across two reads:", split_character())


if __name__ == "__main__":
    main()
