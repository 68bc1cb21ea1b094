/* epoll_echo: the smallest honest TCP echo server, the yardstick for one core.
 *
 *   epoll_echo PORT
 *
 * Listens on 127.0.0.1:PORT (0 picks a free port), prints one line naming the port, and echoes
 * every byte each client sends until the client closes.  One thread, one level-triggered epoll
 * set, non-blocking sockets.  SIGTERM or SIGINT ends it (the default action: nothing to flush).
 *
 * Backpressure: what send() could not take is kept in a per-client buffer and the client is not
 * read from again until that buffer has been written, so a client that stops reading costs at
 * most one read's worth of memory and is never answered out of order.
 *
 * Build: cc -O2 -Wall -Wextra -o epoll_echo epoll_echo.c   (Linux only: epoll, accept4)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

/* One read's worth: also the most a slow client can make the server hold for it. */
#define READ_SIZE (256 * 1024)
#define MAX_EVENTS 512

struct client {
    int fd;
    char *pending;  /* bytes read but not yet written back; NULL when there are none */
    size_t pending_offset, pending_length;
};

static int epoll_fd;
static int listen_fd;
static char read_buffer[READ_SIZE];

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* Holding many idle connections needs descriptors: take the hard limit, the soft one is often 1024. */
static void raise_descriptor_limit(void) {
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
}

static void watch(struct client *client, uint32_t events, int operation) {
    struct epoll_event event = {.events = events, .data.ptr = client};
    if (epoll_ctl(epoll_fd, operation, client->fd, &event) < 0) die("epoll_ctl");
}

static void drop(struct client *client) {
    close(client->fd);  /* also removes it from the epoll set */
    free(client->pending);
    free(client);
}

static void accept_all(void) {
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) perror("accept4");
            /* EMFILE and friends: the connection waits in the backlog; nothing better to do. */
            return;
        }
        /* Echoes are small and latency-bound: do not let Nagle hold them back. */
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct client *client = calloc(1, sizeof *client);
        if (client == NULL) {
            close(fd);
            continue;
        }
        client->fd = fd;
        watch(client, EPOLLIN, EPOLL_CTL_ADD);
    }
}

/* Write what is pending; returns 0 when all of it went, 1 when the socket is full, -1 on error. */
static int flush_pending(struct client *client) {
    while (client->pending_offset < client->pending_length) {
        ssize_t written = send(client->fd, client->pending + client->pending_offset,
                               client->pending_length - client->pending_offset, MSG_NOSIGNAL);
        if (written < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 1;
            return -1;
        }
        client->pending_offset += (size_t)written;
    }
    free(client->pending);
    client->pending = NULL;
    client->pending_offset = client->pending_length = 0;
    return 0;
}

/* Read once and echo it; returns -1 when the client is gone. */
static int echo(struct client *client) {
    ssize_t got = recv(client->fd, read_buffer, sizeof read_buffer, 0);
    if (got == 0) return -1;  /* the client closed and everything it sent has been echoed */
    if (got < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
    size_t offset = 0;
    while (offset < (size_t)got) {
        ssize_t written = send(client->fd, read_buffer + offset, (size_t)got - offset, MSG_NOSIGNAL);
        if (written < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
            /* The client is not reading fast enough: keep the rest, wait until it can take more,
             * and read nothing from it meanwhile (that is what pushes back on the client). */
            client->pending_length = (size_t)got - offset;
            client->pending = malloc(client->pending_length);
            if (client->pending == NULL) return -1;
            memcpy(client->pending, read_buffer + offset, client->pending_length);
            client->pending_offset = 0;
            watch(client, EPOLLOUT, EPOLL_CTL_MOD);
            return 0;
        }
        offset += (size_t)written;
    }
    return 0;
}

static void serve(struct client *client, uint32_t events) {
    int status;
    if (client->pending != NULL) {
        /* Only EPOLLOUT (or an error) is asked for while bytes are pending. */
        status = flush_pending(client);
        if (status == 0) watch(client, EPOLLIN, EPOLL_CTL_MOD);
    } else if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        /* recv reports an error or end of stream itself, after any data still queued. */
        status = echo(client);
    } else {
        status = 0;
    }
    if (status < 0) drop(client);
}

int main(int argc, char **argv) {
    char *end;
    long port = argc == 2 ? strtol(argv[1], &end, 10) : -1;
    if (argc != 2 || *argv[1] == '\0' || *end != '\0' || port < 0 || port > 65535) {
        fprintf(stderr, "usage: epoll_echo PORT   (listens on 127.0.0.1; 0 picks a free port)\n");
        return 2;
    }
    raise_descriptor_limit();

    listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listen_fd < 0) die("socket");
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listen_fd, (struct sockaddr *)&address, sizeof address) < 0) die("bind");
    /* The kernel caps the backlog at net.core.somaxconn: ask for as much as it allows. */
    if (listen(listen_fd, INT_MAX) < 0) die("listen");
    socklen_t length = sizeof address;
    getsockname(listen_fd, (struct sockaddr *)&address, &length);
    printf("epoll_echo listening on 127.0.0.1:%d\n", ntohs(address.sin_port));
    fflush(stdout);

    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd < 0) die("epoll_create1");
    /* The listener is told apart from clients by a NULL pointer. */
    struct epoll_event listener = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, listen_fd, &listener) < 0) die("epoll_ctl");

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int ready = epoll_wait(epoll_fd, events, MAX_EVENTS, -1);
        if (ready < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < ready; i++) {
            if (events[i].data.ptr == NULL)
                accept_all();
            else
                serve(events[i].data.ptr, events[i].events);
        }
    }
}
