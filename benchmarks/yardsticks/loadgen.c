/* loadgen: a TCP echo load generator that checks every byte it gets back.
 *
 *   loadgen HOST PORT MODE CONNS SIZE SECONDS
 *
 * MODE pingpong  each of CONNS connections sends SIZE bytes, waits until all SIZE are back, and
 *                repeats: round trips/s, and the latency of a round trip.
 * MODE stream    each connection keeps 256 KiB in flight, written SIZE bytes per send():
 *                echoed MB/s.
 * MODE oneshot   CONNS slots, each connecting, echoing SIZE bytes and closing, over and over:
 *                connections/s, and the latency from connect() to the last byte back.
 * MODE hold      CONNS connections each echo SIZE bytes once and then stay open and idle until
 *                the end; `completed` counts the connections that got their echo.
 *
 * The first second is warm-up: nothing done in it is counted (except in hold, whose connections
 * are all made then); SECONDS more are measured.  The result is one JSON line on stdout:
 *
 *   {"mode":..., "conns":..., "size":..., "seconds":..., "ops_per_s":..., "mb_per_s":...,
 *    "p50_us":..., "p99_us":..., "p999_us":..., "completed":..., "errors":..., "mismatches":...}
 *
 * `completed` is the operations (round trips, connections) in the measured seconds, or in hold
 * the connections echoed at all; `errors` the connections that failed, were reset or closed
 * early; `mismatches` the echoed bytes that differ from what was sent there, plus bytes the
 * server sent that were never sent to it.  The exit status is 1 when there was a mismatch.
 *
 * Every connection writes a stream drawn from one pseudo-random pattern, starting at an offset of
 * its own, and every byte read back is compared with the byte written at that stream position:
 * a server that drops, repeats, reorders or mixes up bytes (between connections too) is caught.
 *
 * LOADGEN_SRC_IPS=N binds the outgoing connections, round-robin, to 127.0.0.2 .. 127.0.0.(N+1).
 * Use it for oneshot: from one source address, sockets in TIME-WAIT make the kernel's search for
 * a free local port slow, and connect() then caps any server near 14,000 connections/s.
 *
 * Build: cc -O2 -Wall -Wextra -o loadgen loadgen.c   (Linux only: epoll)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24 /* Linux 4.2+; older C libraries lack the name */
#endif

#define WARMUP_S 1.0
#define WINDOW (256 * 1024) /* stream: bytes in flight per connection */
/* The pattern repeats every PERIOD bytes.  A prime, so that no power-of-two buffer or chunk size
 * lines up with it: a chunk echoed twice or skipped lands at another phase and is caught. */
#define PERIOD 65521u
#define MAX_EVENTS 1024

/* Latency histogram, in microseconds: exact below 2048 us, then 1024 buckets per power of two
 * (0.1% resolution) up to 2^40 us.  No cap that would hide a slow tail. */
#define SUB_BITS 10
#define SUB_COUNT (1u << SUB_BITS)
#define MAX_EXPONENT 40
#define BUCKETS ((MAX_EXPONENT - SUB_BITS + 1) * SUB_COUNT)

enum mode { PINGPONG, STREAM, ONESHOT, HOLD };
static const char *const MODE_NAMES[] = {"pingpong", "stream", "oneshot", "hold"};

struct conn {
    int fd;               /* -1 once a held connection is lost (hold does not replace those) */
    bool connecting;      /* connect() not finished yet */
    bool want_write;      /* EPOLLOUT is in the interest set */
    bool echoed;          /* hold: this connection got its echo and now idles */
    uint64_t base;        /* pattern position of this connection's first byte */
    uint64_t sent;        /* bytes written on this connection */
    uint64_t received;    /* bytes read back and checked */
    uint64_t goal;        /* pingpong, oneshot, hold: where the current message ends */
    double started;       /* when the current operation began */
};

/* Settings, from the command line. */
static enum mode mode;
static int connection_count;
static size_t size;
static struct sockaddr_in server_address;
static unsigned source_count; /* LOADGEN_SRC_IPS */

/* Running state. */
static int epoll_fd;
static unsigned char *pattern; /* PERIOD bytes, then repeated far enough to send from any phase */
static unsigned char *read_buffer;
static size_t read_size;
static bool counting; /* past the warm-up */
static uint64_t next_connection;
static uint64_t histogram[BUCKETS];

/* Results. */
static uint64_t completed, errors, mismatches, bytes_back;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static size_t bucket_of(uint64_t us) {
    if (us < 2 * SUB_COUNT) return (size_t)us;
    int exponent = 63 - __builtin_clzll(us); /* >= SUB_BITS + 1 */
    if (exponent >= MAX_EXPONENT) return BUCKETS - 1;
    return (size_t)(exponent - SUB_BITS) * SUB_COUNT + (size_t)(us >> (exponent - SUB_BITS));
}

/* The smallest value that falls in a bucket (the inverse of bucket_of). */
static uint64_t bucket_floor(size_t bucket) {
    if (bucket < 2 * SUB_COUNT) return bucket;
    int exponent = (int)(bucket / SUB_COUNT) + SUB_BITS - 1;
    uint64_t mantissa = bucket - (size_t)(exponent - SUB_BITS) * SUB_COUNT;
    return mantissa << (exponent - SUB_BITS);
}

static void record_latency(double seconds) {
    if (!counting && mode != HOLD) return;
    histogram[bucket_of(seconds <= 0 ? 0 : (uint64_t)(seconds * 1e6))]++;
}

static uint64_t percentile(double fraction) {
    uint64_t total = 0;
    for (size_t i = 0; i < BUCKETS; i++) total += histogram[i];
    if (total == 0) return 0;
    uint64_t rank = (uint64_t)(fraction * (double)total);
    if (rank < 1) rank = 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < BUCKETS; i++) {
        seen += histogram[i];
        if (seen >= rank) return bucket_floor(i);
    }
    return bucket_floor(BUCKETS - 1);
}

/* The bytes to send from stream position `position` on: contiguous for up to read_size bytes. */
static const unsigned char *pattern_at(uint64_t position) {
    return pattern + position % PERIOD;
}

static void build_pattern(void) {
    size_t length = PERIOD + read_size;
    pattern = malloc(length);
    if (pattern == NULL) die("malloc");
    uint32_t state = 0x9e3779b9u; /* xorshift32: cheap, and no short cycles */
    for (size_t i = 0; i < PERIOD; i++) {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        pattern[i] = (unsigned char)(state >> 24);
    }
    for (size_t i = PERIOD; i < length; i++) pattern[i] = pattern[i - PERIOD];
}

static void set_interest(struct conn *c, bool want_write) {
    if (c->want_write == want_write) return;
    struct epoll_event event = {.events = EPOLLIN | (want_write ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c->fd, &event) < 0) die("epoll_ctl");
    c->want_write = want_write;
}

static void open_conn(struct conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (source_count > 0) {
        /* Only the address is fixed here; the port is chosen at connect(), per destination, so
         * that each source address has the whole ephemeral port range to itself. */
        struct sockaddr_in source = {.sin_family = AF_INET};
        source.sin_addr.s_addr = htonl(INADDR_LOOPBACK + 1 + (uint32_t)(next_connection % source_count));
        setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(c->fd, (struct sockaddr *)&source, sizeof source) < 0) die("bind (LOADGEN_SRC_IPS)");
    }
    /* A different starting phase for every connection: bytes echoed on the wrong one show. */
    c->base = (next_connection++ * 7919u) % PERIOD;
    c->sent = c->received = 0;
    c->goal = size;
    c->echoed = false;
    c->connecting = true;
    c->want_write = true;
    c->started = now();
    struct epoll_event event = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, c->fd, &event) < 0) die("epoll_ctl");
    /* A connect() that fails at once (no free port, refused) leaves a closed socket, which the
     * next wait reports as EPOLLHUP: handle() counts it then, like one that fails later. */
    connect(c->fd, (struct sockaddr *)&server_address, sizeof server_address);
}

/* A connection failed or the server closed it: count it and, unless it was a held one, replace it. */
static void fail(struct conn *c) {
    errors++;
    close(c->fd);
    c->fd = -1;
    if (mode == HOLD && c->echoed) return;
    open_conn(c);
}

/* Write until the current message (or the stream window) is out or the socket is full. */
static int send_more(struct conn *c) {
    uint64_t limit = mode == STREAM ? c->received + WINDOW : c->goal;
    while (c->sent < limit) {
        size_t chunk = limit - c->sent < size ? (size_t)(limit - c->sent) : size;
        ssize_t written = send(c->fd, pattern_at(c->base + c->sent), chunk, MSG_NOSIGNAL);
        if (written < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
            set_interest(c, true);
            return 0;
        }
        c->sent += (uint64_t)written;
    }
    set_interest(c, false);
    return 0;
}

/* Compare `length` echoed bytes with what was sent from stream position c->received on. */
static void check(struct conn *c, const unsigned char *data, size_t length) {
    uint64_t expected_length = c->sent - c->received;
    if (length > expected_length) {
        mismatches += length - expected_length; /* bytes nobody sent */
        length = (size_t)expected_length;
    }
    const unsigned char *expected = pattern_at(c->base + c->received);
    if (memcmp(data, expected, length) != 0) {
        for (size_t i = 0; i < length; i++) mismatches += data[i] != expected[i];
    }
    c->received += length;
}

/* One operation (round trip, connection, hold echo) finished on c. */
static int complete(struct conn *c) {
    double finished = now();
    record_latency(finished - c->started);
    switch (mode) {
    case PINGPONG:
        if (counting) {
            completed++;
            bytes_back += size;
        }
        c->goal += size;
        c->started = finished;
        return send_more(c);
    case ONESHOT:
        if (counting) {
            completed++;
            bytes_back += size;
        }
        close(c->fd);
        open_conn(c);
        return 0;
    case HOLD:
        completed++;
        c->echoed = true;
        return 0;
    case STREAM:
        break;
    }
    return 0;
}

static void handle(struct conn *c, uint32_t events) {
    if (c->connecting) {
        if (!(events & EPOLLOUT) || (events & (EPOLLERR | EPOLLHUP))) {
            fail(c); /* refused, or reset before it was established */
            return;
        }
        c->connecting = false;
        if (mode != ONESHOT) c->started = now(); /* only oneshot's latency includes connect() */
    }
    if ((events & EPOLLOUT) && send_more(c) < 0) {
        fail(c);
        return;
    }
    if (!(events & (EPOLLIN | EPOLLERR | EPOLLHUP))) return;
    /* One read per event: level-triggered epoll reports what is left on the next wait. */
    ssize_t got = recv(c->fd, read_buffer, read_size, 0);
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (got <= 0) {
        fail(c); /* reset, or closed by the server: never expected before we close */
        return;
    }
    check(c, read_buffer, (size_t)got);
    if (mode == STREAM) {
        if (counting) bytes_back += (uint64_t)got;
        if (send_more(c) < 0) fail(c);
        return;
    }
    if (c->received == c->goal && !c->echoed && complete(c) < 0) fail(c);
}

static long parse_number(const char *text, const char *name, long minimum, long maximum) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || errno != 0 || value < minimum || value > maximum) {
        fprintf(stderr, "loadgen: %s must be a whole number from %ld to %ld, not %s\n", name,
                minimum, maximum, text);
        exit(2);
    }
    return value;
}

static void resolve(const char *host, long port) {
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *found;
    int status = getaddrinfo(host, NULL, &hints, &found);
    if (status != 0) {
        fprintf(stderr, "loadgen: cannot resolve %s: %s\n", host, gai_strerror(status));
        exit(2);
    }
    memcpy(&server_address, found->ai_addr, sizeof server_address);
    server_address.sin_port = htons((uint16_t)port);
    freeaddrinfo(found);
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: loadgen HOST PORT pingpong|stream|oneshot|hold CONNS SIZE SECONDS\n");
        return 2;
    }
    long port = parse_number(argv[2], "PORT", 1, 65535);
    int chosen = -1;
    for (int i = 0; i < 4; i++)
        if (strcmp(argv[3], MODE_NAMES[i]) == 0) chosen = i;
    if (chosen < 0) {
        fprintf(stderr, "loadgen: MODE must be pingpong, stream, oneshot or hold, not %s\n", argv[3]);
        return 2;
    }
    mode = (enum mode)chosen;
    connection_count = (int)parse_number(argv[4], "CONNS", 1, 10000000);
    size = (size_t)parse_number(argv[5], "SIZE", 1, 1L << 30);
    char *end;
    double seconds = strtod(argv[6], &end);
    if (*argv[6] == '\0' || *end != '\0' || !(seconds > 0)) {
        fprintf(stderr, "loadgen: SECONDS must be a positive number, not %s\n", argv[6]);
        return 2;
    }
    const char *sources = getenv("LOADGEN_SRC_IPS");
    if (sources != NULL && *sources != '\0')
        source_count = (unsigned)parse_number(sources, "LOADGEN_SRC_IPS", 0, 1 << 20);
    resolve(argv[1], port);

    /* One process holds every connection: take all the descriptors the hard limit allows. */
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }

    read_size = size > WINDOW ? size : WINDOW;
    build_pattern();
    read_buffer = malloc(read_size);
    struct conn *conns = calloc((size_t)connection_count, sizeof *conns);
    if (read_buffer == NULL || conns == NULL) die("malloc");
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd < 0) die("epoll_create1");

    double start = now();
    double measure_from = start + WARMUP_S, measure_until = measure_from + seconds;
    double measured_start = measure_from;
    for (int i = 0; i < connection_count; i++) open_conn(&conns[i]);

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        double t = now();
        if (!counting && t >= measure_from) {
            counting = true;
            measured_start = t;
        }
        if (t >= measure_until) break;
        double next = counting ? measure_until : measure_from;
        int timeout_ms = (int)((next - t) * 1000.0) + 1;
        if (timeout_ms > 100) timeout_ms = 100;
        int ready = epoll_wait(epoll_fd, events, MAX_EVENTS, timeout_ms);
        if (ready < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < ready; i++) handle(events[i].data.ptr, events[i].events);
    }
    double elapsed = now() - measured_start;
    uint64_t operations = completed;
    if (mode == HOLD) operations = 0; /* hold measures memory, not a rate */

    printf("{\"mode\":\"%s\",\"conns\":%d,\"size\":%zu,\"seconds\":%.2f,\"ops_per_s\":%.0f,"
           "\"mb_per_s\":%.1f,\"p50_us\":%llu,\"p99_us\":%llu,\"p999_us\":%llu,"
           "\"completed\":%llu,\"errors\":%llu,\"mismatches\":%llu}\n",
           MODE_NAMES[mode], connection_count, size, elapsed, (double)operations / elapsed,
           (double)bytes_back / elapsed / 1e6, (unsigned long long)percentile(0.5),
           (unsigned long long)percentile(0.99), (unsigned long long)percentile(0.999),
           (unsigned long long)completed, (unsigned long long)errors,
           (unsigned long long)mismatches);
    return mismatches ? 1 : 0;
}
