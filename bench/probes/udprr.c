/*
 * udprr: UDP request/response over one socket.
 *   udprr serve PORT              answers every datagram on 0.0.0.0:PORT
 *                                 with the same bytes
 *   udprr decoy PORT              answers every datagram with other bytes:
 *                                 another AID's instance, which a client
 *                                 must never reach
 *   udprr ask HOST PORT MILLIS    sends a 32-byte request with sendto and
 *                                 waits for its answer with recvfrom, again
 *                                 and again for MILLIS ms; prints the round
 *                                 trips per second (round_trips_per_s=N).
 *                                 Every answer must come
 *                                 from HOST:PORT and carry the request's
 *                                 sequence number, or it exits with 1.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int serve(const char *port, int decoy) {
    struct sockaddr_in a;
    parse_addr("0.0.0.0", port, &a);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        perror("udprr serve: bind");
        return 1;
    }
    char buf[2048];
    for (;;) {
        struct sockaddr_storage peer;
        socklen_t len = sizeof peer;
        ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&peer, &len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("udprr serve: recvfrom");
            return 1;
        }
        if (decoy)
            memset(buf, 'D', (size_t)n);
        if (sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, len) < 0 && errno != EINTR) {
            perror("udprr serve: sendto");
            return 1;
        }
    }
}

static int ask(const char *host, const char *port, const char *millis) {
    struct sockaddr_in to;
    if (parse_addr(host, port, &to) != 0) {
        fprintf(stderr, "udprr ask: bad address %s\n", host);
        return 1;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct timeval timeout = {.tv_sec = 2};
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) != 0) {
        perror("udprr ask: socket");
        return 1;
    }
    double limit = atof(millis);
    double start = now_ms();
    uint64_t rounds = 0;
    char req[32] = {0}, ans[64];
    while (now_ms() - start < limit) {
        memcpy(req, &rounds, sizeof rounds);
        if (sendto(fd, req, sizeof req, 0, (struct sockaddr *)&to, sizeof to) != sizeof req) {
            perror("udprr ask: sendto");
            return 1;
        }
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        ssize_t n = recvfrom(fd, ans, sizeof ans, 0, (struct sockaddr *)&from, &len);
        if (n < 0) {
            perror("udprr ask: recvfrom");
            return 1;
        }
        if (n != sizeof req || memcmp(ans, req, sizeof req) != 0 || from.sin_port != to.sin_port ||
            from.sin_addr.s_addr != to.sin_addr.s_addr) {
            fprintf(stderr, "udprr ask: answer %llu is not the request's, or not from %s:%s\n",
                    (unsigned long long)rounds, host, port);
            return 1;
        }
        rounds++;
    }
    printf("round_trips_per_s=%.1f\n", rounds / ((now_ms() - start) / 1e3));
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "serve") == 0)
        return serve(argv[2], 0);
    if (argc == 3 && strcmp(argv[1], "decoy") == 0)
        return serve(argv[2], 1);
    if (argc == 5 && strcmp(argv[1], "ask") == 0)
        return ask(argv[2], argv[3], argv[4]);
    fprintf(stderr, "usage: udprr serve|decoy PORT | udprr ask HOST PORT MILLIS\n");
    return 2;
}
