/* streamsvc's exec shim: set a tool's resource limits, then become the tool.
 *
 *   confine RESOURCE:SOFT:HARD ... -- PATH ARGV0 [ARG...]
 *
 * The service spawns it with vfork (no copy of the service) inside the job's cgroups;
 * the limits are in place before the tool's first instruction. It holds no policy:
 * the service computes every number. Exit 126: bad limits; 127: the tool cannot run.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static int set_limit(const char *spec) {
    char *end;
    errno = 0;
    long which = strtol(spec, &end, 10);
    if (errno || *end != ':') return -1;
    unsigned long long soft = strtoull(end + 1, &end, 10);
    if (errno || *end != ':') return -1;
    unsigned long long hard = strtoull(end + 1, &end, 10);
    if (errno || *end != '\0') return -1;
    struct rlimit limit = {(rlim_t)soft, (rlim_t)hard};
    return setrlimit((int)which, &limit);
}

int main(int argc, char **argv) {
    int i = 1;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (set_limit(argv[i]) != 0) {
            fprintf(stderr, "streamsvc: cannot set limit %s: %s\n", argv[i], strerror(errno));
            return 126;
        }
    }
    if (i + 2 >= argc) {
        fputs("usage: confine RESOURCE:SOFT:HARD ... -- PATH ARGV0 [ARG...]\n", stderr);
        return 126;
    }
    execv(argv[i + 1], argv + i + 2);
    fprintf(stderr, "streamsvc: cannot run %s: %s\n", argv[i + 1], strerror(errno));
    return 127;
}
