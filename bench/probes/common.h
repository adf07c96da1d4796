/*
 * common.h: the TCP setup of the probes that serve (connrate, memhold).
 * bench/src/probes.rs embeds it like the probes' sources and writes it
 * next to each of them before compiling.
 */
#ifndef APPSHOT_BENCH_PROBES_COMMON_H
#define APPSHOT_BENCH_PROBES_COMMON_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* HOST (dotted IPv4) and PORT into *a; -1 when HOST is not an address. */
static inline int parse_addr(const char *host, const char *port, struct sockaddr_in *a) {
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons((unsigned short)atoi(port));
    return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? 0 : -1;
}

/* A TCP socket bound to *a (SO_REUSEADDR) and listening with BACKLOG;
 * -1, after perror, when any step fails. */
static inline int listen_on(const struct sockaddr_in *a, int backlog) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0) {
        perror("socket");
        return -1;
    }
    if (bind(fd, (const struct sockaddr *)a, sizeof *a) != 0) {
        perror("bind");
        return -1;
    }
    if (listen(fd, backlog) != 0) {
        perror("listen");
        return -1;
    }
    return fd;
}

/* The next connection on the listening FD, past EINTR and ECONNABORTED;
 * -1, after perror, on any other error. */
static inline int accept_next(int fd) {
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c >= 0)
            return c;
        if (errno != EINTR && errno != ECONNABORTED) {
            perror("accept");
            return -1;
        }
    }
}

#endif
