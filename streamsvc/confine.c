/* streamsvc's exec shim: confine a tool (cgroups, user, resource limits), then become it.
 *
 *   confine [cgroup:FD ...] [user:UID:GID] RESOURCE:SOFT:HARD ... -- PATH ARGV0 [ARG...]
 *
 * The service spawns it with vfork (no copy of the service). It joins the job's cgroups
 * through the `cgroup.procs` files the service opened for it (FD: written "0", i.e.
 * itself, then closed: the tool never holds them), so the tool is born inside them. With
 * `user:`, it then drops root for good: no supplementary groups, then the group, then the
 * user (real, effective and saved IDs alike). It is done here, not by the spawn, so that
 * the spawn stays a vfork (Python forks the whole service to change IDs) and the shim, in
 * the service's private cache, is run by root. The limits are in place before the tool's
 * first instruction. It holds no policy: the service computes every number. Exit 126: a
 * group, the user or a limit could not be set; 127: the tool cannot run.
 */
#include <errno.h>
#include <grp.h>
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

static int join_group(const char *fd_text) {
    char *end;
    errno = 0;
    long fd = strtol(fd_text, &end, 10);
    if (errno || *end != '\0' || fd < 0) {
        errno = EINVAL;
        return -1;
    }
    ssize_t written = write((int)fd, "0", 1);
    int saved = errno;
    close((int)fd);
    errno = saved;
    return written == 1 ? 0 : -1;
}

static int become_user(const char *spec) {
    char *end;
    errno = 0;
    unsigned long uid = strtoul(spec, &end, 10);
    if (errno || *end != ':') {
        errno = EINVAL;
        return -1;
    }
    unsigned long gid = strtoul(end + 1, &end, 10);
    if (errno || *end != '\0') {
        errno = EINVAL;
        return -1;
    }
    if (setgroups(0, NULL) != 0 || setgid((gid_t)gid) != 0 || setuid((uid_t)uid) != 0) return -1;
    if (getuid() != uid || geteuid() != uid || getgid() != gid || getegid() != gid || (uid != 0 && setuid(0) == 0)) {
        errno = EPERM;  /* not dropped for good */
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    int i = 1;
    for (; i < argc && strncmp(argv[i], "cgroup:", 7) == 0; i++) {
        if (join_group(argv[i] + 7) != 0) {
            fprintf(stderr, "streamsvc: cannot join the job's cgroup (%s): %s\n", argv[i], strerror(errno));
            return 126;
        }
    }
    if (i < argc && strncmp(argv[i], "user:", 5) == 0) {
        if (become_user(argv[i] + 5) != 0) {
            fprintf(stderr, "streamsvc: cannot become the tools' user (%s): %s\n", argv[i], strerror(errno));
            return 126;
        }
        i++;
    }
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (set_limit(argv[i]) != 0) {
            fprintf(stderr, "streamsvc: cannot set limit %s: %s\n", argv[i], strerror(errno));
            return 126;
        }
    }
    if (i + 2 >= argc) {
        fputs("usage: confine [cgroup:FD ...] [user:UID:GID] RESOURCE:SOFT:HARD ... -- PATH ARGV0 [ARG...]\n", stderr);
        return 126;
    }
    execv(argv[i + 1], argv + i + 2);
    fprintf(stderr, "streamsvc: cannot run %s: %s\n", argv[i + 1], strerror(errno));
    return 127;
}
