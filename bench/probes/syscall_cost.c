/*
 * syscall_cost CALL ITERATIONS
 *
 * Times ITERATIONS calls of one syscall on a TCP socket bound to
 * 127.0.0.1:0 and prints the mean cost as "ns_per_call=<float>".
 *
 *   getsockname  trapped by appshot's seccomp filter: every call is a
 *                user notification the supervisor answers.
 *   getsockopt   getsockopt(SO_TYPE): not trapped, the untrapped baseline
 *                (it still runs through the seccomp filter program).
 *   unixconnect  socket + connect to a Unix socket path + accept + close:
 *                under appshot the connect is performed for the task as
 *                the task (its credentials, root, cwd, umask), the
 *                costliest kind of notified call.
 *
 * Port 0 is never multiplexed, so the bind passes through appshot as is.
 * The socket is bound before timing so both calls see the same socket.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static struct sockaddr_un unix_path;

/* fd is the listener the connect reaches. */
static int unix_connect(int fd) {
    int c = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c < 0)
        return -1;
    if (connect(c, (struct sockaddr *)&unix_path, sizeof unix_path) != 0) {
        close(c);
        return -1;
    }
    int a = accept(fd, NULL, NULL);
    close(c);
    if (a < 0)
        return -1;
    close(a);
    return 0;
}

static int one_call(const char *call, int fd) {
    if (strcmp(call, "unixconnect") == 0)
        return unix_connect(fd);
    if (strcmp(call, "getsockname") == 0) {
        struct sockaddr_in a;
        socklen_t len = sizeof a;
        return getsockname(fd, (struct sockaddr *)&a, &len);
    }
    int type;
    socklen_t len = sizeof type;
    return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len);
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[1], "getsockname") != 0 && strcmp(argv[1], "getsockopt") != 0 &&
                      strcmp(argv[1], "unixconnect") != 0)) {
        fprintf(stderr, "usage: %s getsockname|getsockopt|unixconnect ITERATIONS\n", argv[0]);
        return 2;
    }
    const char *call = argv[1];
    long n = atol(argv[2]);
    if (n <= 0) {
        fprintf(stderr, "ITERATIONS must be positive\n");
        return 2;
    }
    int fd;
    if (strcmp(call, "unixconnect") == 0) {
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        unix_path.sun_family = AF_UNIX;
        snprintf(unix_path.sun_path, sizeof unix_path.sun_path, "/tmp/syscall_cost.%d.sock",
                 (int)getpid());
        if (fd < 0 || bind(fd, (struct sockaddr *)&unix_path, sizeof unix_path) != 0 ||
            listen(fd, 16) != 0) {
            perror("unix listener");
            return 1;
        }
    } else {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            perror("socket");
            return 1;
        }
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0) {
            perror("bind 127.0.0.1:0");
            return 1;
        }
    }
    /* A short untimed warm-up: page faults of the first calls and, under
     * appshot, the supervisor's first wake-ups stay out of the figure. */
    for (long i = 0; i < n / 100 + 1; i++) {
        if (one_call(call, fd) != 0) {
            fprintf(stderr, "%s: %s\n", call, strerror(errno));
            return 1;
        }
    }
    double start = now_ns();
    for (long i = 0; i < n; i++) {
        if (one_call(call, fd) != 0) {
            fprintf(stderr, "%s: %s\n", call, strerror(errno));
            return 1;
        }
    }
    double elapsed = now_ns() - start;
    if (unix_path.sun_path[0])
        unlink(unix_path.sun_path);
    printf("ns_per_call=%.3f\n", elapsed / (double)n);
    return 0;
}
