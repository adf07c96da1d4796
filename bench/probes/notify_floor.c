/*
 * notify_floor CMD ARGS...
 *
 * The floor of a notified syscall: runs CMD under a seccomp filter of the
 * shape appshot's has (x86_64 only, x32 numbers killed, bind, connect,
 * getsockname and getpeername sent to SECCOMP_RET_USER_NOTIF, everything
 * else allowed) and serves its listener with the least a supervisor can
 * do: receive, answer SECCOMP_USER_NOTIF_FLAG_CONTINUE, nothing else. The
 * listener has SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP set, as appshot's has.
 * What a notified call costs under appshot beyond this is appshot's own
 * work. Exits with CMD's status.
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP 1
#endif

#define NOTIFY(nr)                                                                                 \
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1),                                               \
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF)

static struct sock_filter program[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
    BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000, 0, 1),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
    NOTIFY(SYS_bind),
    NOTIFY(SYS_connect),
    NOTIFY(SYS_getsockname),
    NOTIFY(SYS_getpeername),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
};

static volatile sig_atomic_t child_done;

static void on_child(int sig) {
    (void)sig;
    child_done = 1;
}

/* In the child: load the filter, hand the listener to the parent through
 * `to_parent`, wait until it has it, close it, exec CMD. */
static void child(int to_parent, int from_parent, char **argv) {
    struct sock_fprog prog = {.len = sizeof program / sizeof program[0], .filter = program};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        perror("PR_SET_NO_NEW_PRIVS");
        _exit(126);
    }
    int listener = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                                SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
    if (listener < 0) {
        perror("seccomp(SET_MODE_FILTER, NEW_LISTENER)");
        _exit(126);
    }
    char go;
    if (write(to_parent, &listener, sizeof listener) != sizeof listener ||
        read(from_parent, &go, 1) != 1) {
        perror("handing the listener over");
        _exit(126);
    }
    close(listener);
    close(to_parent);
    close(from_parent);
    execvp(argv[0], argv);
    perror(argv[0]);
    _exit(127);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s CMD ARGS...\n", argv[0]);
        return 2;
    }
    int up[2], down[2];
    if (pipe(up) != 0 || pipe(down) != 0) {
        perror("pipe");
        return 1;
    }
    struct sigaction sa = {.sa_handler = on_child};
    sigemptyset(&sa.sa_mask);
    /* No SA_RESTART: the end of the child interrupts the receive. */
    sigaction(SIGCHLD, &sa, NULL);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 1;
    }
    if (pid == 0)
        child(up[1], down[0], argv + 1);
    int child_fd;
    if (read(up[0], &child_fd, sizeof child_fd) != sizeof child_fd) {
        fprintf(stderr, "the child did not hand its listener over\n");
        return 1;
    }
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    int listener = pidfd < 0 ? -1 : (int)syscall(SYS_pidfd_getfd, pidfd, child_fd, 0);
    if (listener < 0) {
        perror("pidfd_getfd of the listener");
        return 1;
    }
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP) != 0)
        perror("SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (the floor is measured without)");
    if (write(down[1], "g", 1) != 1) {
        perror("write");
        return 1;
    }
    struct seccomp_notif req;
    struct seccomp_notif_resp resp;
    while (!child_done) {
        memset(&req, 0, sizeof req);
        if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &req) != 0)
            continue; /* EINTR (the child's end) or ENOENT (a caller gone) */
        memset(&resp, 0, sizeof resp);
        resp.id = req.id;
        resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
        ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &resp);
    }
    int status;
    if (waitpid(pid, &status, 0) != pid) {
        perror("waitpid");
        return 1;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
