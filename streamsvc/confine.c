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
 *
 * The tool runs with the SCHED_BATCH policy (its children too): the same share of the CPU,
 * but its wake-ups do not preempt a running process. The service that streams its output,
 * and the clients that read it, are not interrupted each time a tool wakes; a tool that
 * could not be made a batch process runs all the same.
 *
 * It runs once per job, so its own start-up counts: on x86-64 the service builds it with
 * CONFINE_NOLIBC, without the C library, and it makes its few system calls itself. A static
 * glibc build spent ~300 us of CPU starting up before the tool's exec, measured in the VM
 * the benchmark ran on (the tool `true` itself takes ~500 us); this build spends ~45 us.
 * Elsewhere it is built with the C library, the same code behind `sys`.
 */

#if defined(CONFINE_NOLIBC) && defined(__x86_64__)

enum {
    SYS_write = 1,
    SYS_close = 3,
    SYS_execve = 59,
    SYS_getuid = 102,
    SYS_getgid = 104,
    SYS_setuid = 105,
    SYS_setgid = 106,
    SYS_geteuid = 107,
    SYS_getegid = 108,
    SYS_setgroups = 116,
    SYS_sched_setscheduler = 144,
    SYS_exit_group = 231,
    SYS_prlimit64 = 302,
};
enum { EPERM = 1, ENOENT = 2, E2BIG = 7, ENOEXEC = 8, EBADF = 9, ENOMEM = 12, EACCES = 13, ENOTDIR = 20 };
enum { EINVAL = 22, ETXTBSY = 26, ENAMETOOLONG = 36, ELOOP = 40 };

/* a system call: its result, or -errno */
static long sys(long number, long a, long b, long c, long d) {
    register long r10 __asm__("r10") = d;
    long result;
    __asm__ volatile("syscall"
                     : "=a"(result)
                     : "a"(number), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return result;
}

static int confine(int argc, char **argv, char **envp);

/* the kernel's stack at entry: argc, argv..., NULL, envp..., NULL */
__attribute__((used)) static void start(long *stack) {
    int argc = (int)stack[0];
    char **argv = (char **)(stack + 1);
    sys(SYS_exit_group, confine(argc, argv, argv + argc + 1), 0, 0, 0);
}
__asm__(".text\n.global _start\n_start:\n  xor %ebp, %ebp\n  mov %rsp, %rdi\n  and $-16, %rsp\n  call start\n  hlt\n");

#else

#include <errno.h>
#include <sys/syscall.h>
#include <unistd.h>

static long sys(long number, long a, long b, long c, long d) {
    long result = syscall(number, a, b, c, d);
    return result == -1 ? -errno : result;
}

static int confine(int argc, char **argv, char **envp);

int main(int argc, char **argv, char **envp) { return confine(argc, argv, envp); }

#endif

enum { SCHED_BATCH_POLICY = 3 }; /* Linux's SCHED_BATCH */

static void put(const char *text) {
    unsigned long n = 0;
    while (text[n]) n++;
    sys(SYS_write, 2, (long)text, (long)n, 0);
}

static int starts_with(const char *text, const char *prefix) {
    while (*prefix)
        if (*text++ != *prefix++) return 0;
    return 1;
}

/* the decimal number at *text, up to `stop`, which *text is left after; -1 when malformed
 * or over 2^64 - 1 */
static int parse(const char **text, char stop, unsigned long long *value) {
    const char *digit = *text;
    unsigned long long n = 0;
    if (*digit == stop) return -1;
    for (; *digit != stop; digit++) {
        if (*digit < '0' || *digit > '9') return -1;
        unsigned long long next = n * 10 + (unsigned long long)(*digit - '0');
        if (n > 1844674407370955161ULL || next < n * 10) return -1;
        n = next;
    }
    *text = digit + (stop != '\0');
    *value = n;
    return 0;
}

static void say(int error, const char *what, const char *detail) {
    static const char *const names[] = {
        [EPERM] = "operation not permitted", [ENOENT] = "no such file or directory",
        [E2BIG] = "argument list too long",  [ENOEXEC] = "not an executable",
        [EBADF] = "bad file descriptor",     [ENOMEM] = "out of memory",
        [EACCES] = "permission denied",      [ENOTDIR] = "not a directory",
        [EINVAL] = "invalid argument",       [ETXTBSY] = "text file busy",
        [ENAMETOOLONG] = "file name too long", [ELOOP] = "too many symbolic links",
    };
    char code[12];
    int at = (int)sizeof code - 1;
    code[at] = '\0';
    unsigned int n = error > 0 ? (unsigned int)error : 0;
    do code[--at] = (char)('0' + n % 10);
    while ((n /= 10) && at > 0);
    put("streamsvc: ");
    put(what);
    put(" (");
    put(detail);
    put("): ");
    put(error > 0 && error <= ELOOP && names[error] ? names[error] : "error");
    put(" (errno ");
    put(code + at);
    put(")\n");
}

static long set_limit(const char *spec) {
    unsigned long long which, limit[2];
    if (parse(&spec, ':', &which) || which > 64 || parse(&spec, ':', &limit[0]) || parse(&spec, '\0', &limit[1]))
        return -EINVAL;
    return sys(SYS_prlimit64, 0, (long)which, (long)limit, 0);
}

static long join_group(const char *spec) {
    unsigned long long fd;
    if (parse(&spec, '\0', &fd) || fd > 0x7fffffff) return -EINVAL;
    long written = sys(SYS_write, (long)fd, (long)"0", 1, 0);
    sys(SYS_close, (long)fd, 0, 0, 0);
    return written == 1 ? 0 : written < 0 ? written : -EINVAL;
}

static long become_user(const char *spec) {
    unsigned long long uid, gid;
    long error;
    if (parse(&spec, ':', &uid) || parse(&spec, '\0', &gid) || uid > 0xfffffffe || gid > 0xfffffffe) return -EINVAL;
    if ((error = sys(SYS_setgroups, 0, 0, 0, 0)) || (error = sys(SYS_setgid, (long)gid, 0, 0, 0)) ||
        (error = sys(SYS_setuid, (long)uid, 0, 0, 0)))
        return error;
    if ((unsigned long long)sys(SYS_getuid, 0, 0, 0, 0) != uid || (unsigned long long)sys(SYS_geteuid, 0, 0, 0, 0) != uid ||
        (unsigned long long)sys(SYS_getgid, 0, 0, 0, 0) != gid || (unsigned long long)sys(SYS_getegid, 0, 0, 0, 0) != gid ||
        (uid != 0 && sys(SYS_setuid, 0, 0, 0, 0) == 0))
        return -EPERM; /* not dropped for good */
    return 0;
}

static int confine(int argc, char **argv, char **envp) {
    int i = 1;
    long error;
    for (; i < argc && starts_with(argv[i], "cgroup:"); i++)
        if ((error = join_group(argv[i] + 7))) {
            say((int)-error, "cannot join the job's cgroup", argv[i]);
            return 126;
        }
    if (i < argc && starts_with(argv[i], "user:")) {
        if ((error = become_user(argv[i] + 5))) {
            say((int)-error, "cannot become the tools' user", argv[i]);
            return 126;
        }
        i++;
    }
    for (; i < argc && !(argv[i][0] == '-' && argv[i][1] == '-' && argv[i][2] == '\0'); i++)
        if ((error = set_limit(argv[i]))) {
            say((int)-error, "cannot set limit", argv[i]);
            return 126;
        }
    if (i + 2 >= argc) {
        say(EINVAL, "usage", "confine [cgroup:FD ...] [user:UID:GID] RESOURCE:SOFT:HARD ... -- PATH ARGV0 [ARG...]");
        return 126;
    }
    int priority = 0; /* struct sched_param: SCHED_BATCH takes 0 */
    sys(SYS_sched_setscheduler, 0, SCHED_BATCH_POLICY, (long)&priority, 0);
    error = sys(SYS_execve, (long)argv[i + 1], (long)(argv + i + 2), (long)envp, 0);
    say((int)-error, "cannot run", argv[i + 1]);
    return 127;
}
