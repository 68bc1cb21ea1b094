// A Node.js echo server as a peer in benchmarks/run.py: `node node_echo.js PORT`.
// net + pipe, the idiomatic Node echo; one process, one core, like the others.
"use strict";
const net = require("net");
const port = Number(process.argv[2]);
net
  .createServer((socket) => {
    socket.setNoDelay(true);
    socket.on("error", () => socket.destroy());
    socket.pipe(socket);
  })
  .listen({ port, host: "127.0.0.1", backlog: 4096 });
