/*
 * taskman-gate: the first program of every task, started by posix_spawn.
 *
 * Why a program and not a shell: the server must not fork under gRPC and
 * posix_spawn has no hook between fork and exec, so whatever must happen
 * before the task's code runs happens here. Doing it with util-linux tools
 * costs one exec each (unshare, mount, setpriv): several milliseconds per
 * start, against a budget of 2 ms (docs/design.md).
 *
 * Usage:
 *   taskman-gate [-c CGROUP_PROCS]... [-u UID -g GID] [-t TMP_BYTES] [-p] -- DIRECTORY EXECUTABLE ARGV0 [ARG...]
 *
 * In order:
 *   0. with -c: join each of the task's cgroups (write "0", this process, into
 *      each cgroup.procs file given). Here, not in the server: on cgroup v1 a
 *      write to cgroup.procs waits for an RCU grace period (milliseconds),
 *      which the gate spends off the server's event loop and after its reply
 *      (docs/design.md). A failure exits 125 naming the group: the task ends
 *      before any of its code ran;
 *   1. block reading descriptor 3 until the server writes a byte (it has
 *      registered the task; with no -c, it has put this process into the
 *      task's cgroups itself); end of file: the server gave up;
 *   2. with -t or -p: a private mount and IPC namespace; with -t, a fresh
 *      tmpfs of TMP_BYTES on each of /tmp, /var/tmp, /dev/shm and /run/lock
 *      (gone with the task's last process); with -p, a proc instance with hidepid=invisible on /proc, so the task
 *      sees only its own user's processes;
 *   3. with -u/-g: every capability out of the bounding and ambient sets,
 *      no_new_privs (setuid binaries cannot regain root), no supplementary
 *      groups, then the task's gid and uid, umask 077 and no core dumps;
 *   4. chdir to DIRECTORY as the task's user, then execve EXECUTABLE.
 *
 * A failure of the gate itself exits 125 with one line on stderr (the task's
 * output); a failed exec exits 127 (no such file) or 126, as a shell would.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define GATE_FD 3
#define EXIT_GATE 125
#define EXIT_CANNOT_EXECUTE 126
#define EXIT_NOT_FOUND 127

extern char **environ;

static void fail(int code, const char *format, ...)
{
    va_list arguments;
    fputs("taskman-gate: ", stderr);
    va_start(arguments, format);
    vfprintf(stderr, format, arguments);
    va_end(arguments);
    fputc('\n', stderr);
    exit(code);
}

static unsigned long parse_number(const char *text, const char *what)
{
    char *end;
    errno = 0;
    unsigned long value = strtoul(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-')
        fail(EXIT_GATE, "bad %s: %s", what, text);
    return value;
}

#define MAX_GROUPS 16

static void join_group(const char *procs_file)
{
    int fd = open(procs_file, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, "0", 1) != 1)
        fail(EXIT_GATE, "cannot join the task's cgroup %s: %s", procs_file, strerror(errno));
    close(fd);
}

static void wait_for_gate(void)
{
    char byte;
    ssize_t count;
    do
        count = read(GATE_FD, &byte, 1);
    while (count < 0 && errno == EINTR);
    if (count != 1)
        exit(EXIT_GATE); /* the server gave up on this task: nothing to say */
    close(GATE_FD);
}

/* The host's world-writable directories: shared, they would let one user's
 * task leave files for another's, and pages in /dev/shm outlive the task
 * that wrote them (host memory no task limit holds once it has ended). */
static const char *const PRIVATE_DIRECTORIES[] = {"/tmp", "/var/tmp", "/dev/shm", "/run/lock", NULL};

static void mount_private_tmp(const char *target, unsigned long bytes)
{
    char options[64];
    snprintf(options, sizeof options, "mode=1777,size=%lu", bytes);
    if (mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options) == 0)
        return;
    if (errno == ENOENT && strcmp(target, "/tmp") != 0)
        return; /* a host without /var/tmp, /dev/shm or /run/lock */
    fail(EXIT_GATE, "mount tmpfs on %s: %s", target, strerror(errno));
}

static void isolate(unsigned long tmp_bytes, int private_proc)
{
    if (unshare(CLONE_NEWNS | CLONE_NEWIPC) != 0)
        fail(EXIT_GATE, "unshare: %s", strerror(errno));
    /* Without this, the mounts below would propagate back to the host. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        fail(EXIT_GATE, "make / private: %s", strerror(errno));
    if (tmp_bytes)
        for (const char *const *target = PRIVATE_DIRECTORIES; *target; target++)
            mount_private_tmp(*target, tmp_bytes);
    if (private_proc
        && mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible") != 0)
        fail(EXIT_GATE, "mount proc with hidepid: %s", strerror(errno));
}

static void drop_privileges(uid_t uid, gid_t gid)
{
    /* Loop to the kernel's last capability, whatever this was compiled with. */
    for (int capability = 0; prctl(PR_CAPBSET_READ, capability, 0, 0, 0) >= 0; capability++)
        if (prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0)
            fail(EXIT_GATE, "drop capability %d: %s", capability, strerror(errno));
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL)
        fail(EXIT_GATE, "clear ambient capabilities: %s", strerror(errno));
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        fail(EXIT_GATE, "no_new_privs: %s", strerror(errno));
    if (setgroups(0, NULL) != 0)
        fail(EXIT_GATE, "setgroups: %s", strerror(errno));
    if (setresgid(gid, gid, gid) != 0)
        fail(EXIT_GATE, "setresgid %u: %s", (unsigned) gid, strerror(errno));
    if (setresuid(uid, uid, uid) != 0)
        fail(EXIT_GATE, "setresuid %u: %s", (unsigned) uid, strerror(errno));
    /* Leaving uid 0 clears the permitted and effective sets; the inheritable
     * set survives it, so empty every set explicitly. */
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &header, data) != 0)
        fail(EXIT_GATE, "capset: %s", strerror(errno));
    umask(077);
    struct rlimit no_core = {0, 0};
    if (setrlimit(RLIMIT_CORE, &no_core) != 0)
        fail(EXIT_GATE, "RLIMIT_CORE: %s", strerror(errno));
}

int main(int argc, char **argv)
{
    unsigned long tmp_bytes = 0;
    long uid = -1, gid = -1;
    int private_proc = 0, option, groups = 0;
    const char *procs_files[MAX_GROUPS];
    while ((option = getopt(argc, argv, "+c:u:g:t:p")) != -1) {
        switch (option) {
        case 'c':
            if (groups == MAX_GROUPS)
                fail(EXIT_GATE, "more than %d cgroups", MAX_GROUPS);
            procs_files[groups++] = optarg;
            break;
        case 'u': uid = (long) parse_number(optarg, "uid"); break;
        case 'g': gid = (long) parse_number(optarg, "gid"); break;
        case 't': tmp_bytes = parse_number(optarg, "tmp size"); break;
        case 'p': private_proc = 1; break;
        default: fail(EXIT_GATE, "bad option");
        }
    }
    if (argc - optind < 3)
        fail(EXIT_GATE, "usage: taskman-gate [-c CGROUP_PROCS]... [-u UID -g GID] [-t BYTES] [-p] -- DIRECTORY "
                        "EXECUTABLE ARGV0 [ARG...]");
    if ((uid < 0) != (gid < 0) || uid == (long) (uid_t) -1 || gid == (long) (gid_t) -1)
        fail(EXIT_GATE, "give both -u and -g, below 4294967295");
    const char *directory = argv[optind], *executable = argv[optind + 1];
    char **command = argv + optind + 2;

    for (int group = 0; group < groups; group++)
        join_group(procs_files[group]);
    wait_for_gate();
    if (tmp_bytes || private_proc)
        isolate(tmp_bytes, private_proc);
    if (uid >= 0)
        drop_privileges((uid_t) uid, (gid_t) gid);
    if (chdir(directory) != 0)
        fail(EXIT_GATE, "cd %s: %s", directory, strerror(errno));
    execve(executable, command, environ);
    fail(errno == ENOENT ? EXIT_NOT_FOUND : EXIT_CANNOT_EXECUTE, "%s: %s", executable, strerror(errno));
}
