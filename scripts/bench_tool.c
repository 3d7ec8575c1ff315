/* The job tool of scripts/bench.py, in C: the lines of bench_tool.py (same arguments, same
 * bytes), at a small fraction of its CPU time. On a 2-core machine 50 copies of the Python
 * tool pacing one line per millisecond use both cores by themselves; these use about a tenth
 * of one, so the latency and fanout scenarios measure the service, not the tool.
 *
 *     cc -O2 -o bench_tool bench_tool.c
 *     bench_tool COUNT SIZE [--rate LINES_PER_S] [--gate SOCKET]
 *
 * A line is SIZE bytes with its newline: "<print time, ns since the epoch:019> <seq:09> xx..x"
 * (under 32 bytes: "<seq:09>x..x"). The print time is CLOCK_REALTIME, Python's time.time_ns().
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum { STAMPED_MIN_SIZE = 32, UNSTAMPED_MIN_SIZE = 10, WRITE_BYTES = 64 * 1024, GATE_BOUND_S = 120 };

static long long now_ns(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Lines first..stop-1 of `size` bytes, stamped `stamp`, into `out` (room for them and a NUL). */
static size_t fill(char *out, long first, long stop, int size, long long stamp) {
    char *p = out;
    for (long seq = first; seq < stop; seq++) {
        int head = size >= STAMPED_MIN_SIZE ? sprintf(p, "%019lld %09ld ", stamp, seq) : sprintf(p, "%09ld", seq);
        memset(p + head, 'x', (size_t)(size - 1 - head));
        p[size - 1] = '\n';
        p += size;
    }
    return (size_t)(p - out);
}

static void write_all(const char *data, size_t length) {
    while (length) {
        ssize_t written = write(1, data, length);
        if (written < 0) {
            if (errno == EINTR) continue;
            exit(1); /* the reader left */
        }
        data += written;
        length -= (size_t)written;
    }
}

/* Write lines sent..due-1, stamped now, at most `per_write` lines a write. */
static void emit(char *buffer, long sent, long due, int size, long per_write) {
    while (sent < due) {
        long stop = sent + per_write < due ? sent + per_write : due;
        write_all(buffer, fill(buffer, sent, stop, size, now_ns(CLOCK_REALTIME)));
        sent = stop;
    }
}

static int wait_for_gate(const char *path) {
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    struct timeval bound = {.tv_sec = GATE_BOUND_S};
    char go = 0;
    int gate = socket(AF_UNIX, SOCK_STREAM, 0);
    if (gate < 0 || strlen(path) >= sizeof address.sun_path) return -1;
    strcpy(address.sun_path, path);
    setsockopt(gate, SOL_SOCKET, SO_RCVTIMEO, &bound, sizeof bound);
    if (connect(gate, (struct sockaddr *)&address, sizeof address) < 0 || recv(gate, &go, 1, 0) != 1 || go != 'g') {
        close(gate);
        return -1;
    }
    return close(gate);
}

int main(int argc, char **argv) {
    const char *gate = NULL;
    double rate = 0;
    if (argc < 3) {
        fprintf(stderr, "usage: %s COUNT SIZE [--rate LINES_PER_S] [--gate SOCKET]\n", argv[0]);
        return 2;
    }
    long count = atol(argv[1]);
    int size = atoi(argv[2]);
    for (int i = 3; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--rate")) rate = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--gate")) gate = argv[i + 1];
    }
    if (size < UNSTAMPED_MIN_SIZE || count < 0 || rate < 0) {
        fprintf(stderr, "bench_tool: size must be at least %d, count and rate not negative\n", UNSTAMPED_MIN_SIZE);
        return 2;
    }
    if (gate && wait_for_gate(gate) < 0) {
        fprintf(stderr, "bench_tool: no go from %s: %s\n", gate, strerror(errno));
        return 3;
    }
    long per_write = WRITE_BYTES / size > 0 ? WRITE_BYTES / size : 1;
    char *buffer = malloc((size_t)(per_write * size + 64));
    if (!buffer) return 1;
    if (!rate) {
        emit(buffer, 0, count, size, per_write);
        return 0;
    }
    long long period = llround(1e9 / rate), start = now_ns(CLOCK_MONOTONIC);
    for (long sent = 0; sent < count;) {
        long due = (now_ns(CLOCK_MONOTONIC) - start) / period + 1;
        due = due < count ? due : count;
        emit(buffer, sent, due, size, per_write);
        sent = due;
        long long next = start + sent * period;
        struct timespec until = {.tv_sec = next / 1000000000LL, .tv_nsec = next % 1000000000LL};
        while (sent < count && clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR) {
        }
    }
    return 0;
}
