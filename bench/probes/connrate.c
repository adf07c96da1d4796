/*
 * connrate: connection setup and teardown rate over TCP.
 *
 *   connrate server HOST PORT   accept, close at once, forever
 *   connrate decoy HOST PORT    accept, write "decoy\n", close, forever
 *   connrate client HOST PORT COUNT
 *       COUNT times: connect, read until EOF, close; then prints
 *       "conns_per_s=<float>". A connection that delivers any byte reached
 *       a decoy (a server of another AID): the client fails, so a routing
 *       mistake can never pass for a measurement.
 *
 * The client's first connect is retried on ECONNREFUSED for up to 5 s,
 * for a server started beside it that may not listen yet.
 *
 * The client waits for the server's close before closing its own end, so
 * each iteration covers the whole connect + accept + close exchange and
 * the TIME_WAIT state stays on the server side, not on the client's
 * ephemeral ports.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

static int serve(const struct sockaddr_in *a, int decoy) {
    int fd = listen_on(a, 4096);
    if (fd < 0)
        return 1;
    for (;;) {
        int c = accept_next(fd);
        if (c < 0)
            return 1;
        if (decoy && write(c, "decoy\n", 6) < 0)
            perror("write");
        close(c);
    }
}

static int client(const struct sockaddr_in *a, long count) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            perror("socket");
            return 1;
        }
        int r;
        /* Only the first connection waits for a server still starting
         * (one started beside the client in the same sandbox). */
        for (int tries = 0; (r = connect(fd, (const struct sockaddr *)a, sizeof *a)) != 0 &&
                            i == 0 && errno == ECONNREFUSED && tries < 100;
             tries++) {
            close(fd);
            usleep(50000);
            fd = socket(AF_INET, SOCK_STREAM, 0);
            if (fd < 0) {
                perror("socket");
                return 1;
            }
        }
        if (r != 0) {
            fprintf(stderr, "connect #%ld: %s\n", i, strerror(errno));
            return 1;
        }
        char buf[64];
        ssize_t n;
        while ((n = read(fd, buf, sizeof buf)) < 0 && errno == EINTR)
            ;
        if (n < 0) {
            fprintf(stderr, "read #%ld: %s\n", i, strerror(errno));
            return 1;
        }
        if (n > 0) {
            fprintf(stderr, "connection #%ld reached a decoy server (another AID's instance)\n", i);
            return 3;
        }
        close(fd);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("conns_per_s=%.1f\n", (double)count / secs);
    return 0;
}

int main(int argc, char **argv) {
    struct sockaddr_in a;
    if (argc >= 4 && parse_addr(argv[2], argv[3], &a) == 0) {
        if (argc == 4 && strcmp(argv[1], "server") == 0)
            return serve(&a, 0);
        if (argc == 4 && strcmp(argv[1], "decoy") == 0)
            return serve(&a, 1);
        if (argc == 5 && strcmp(argv[1], "client") == 0 && atol(argv[4]) > 0)
            return client(&a, atol(argv[4]));
    }
    fprintf(stderr, "usage: %s server|decoy HOST PORT | client HOST PORT COUNT\n", argv[0]);
    return 2;
}
