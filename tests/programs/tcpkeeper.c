/* A process holding one established TCP connection with bytes queued every
 * way at a snapshot, for tests/tests/connections.rs.
 *
 * Listens on 127.0.0.1:argv[1] and accepts one connection. It sets a small
 * receive buffer on it, writes the pattern P(i) ^ 0x5a (i: the byte's
 * offset in the stream) without blocking until the peer's window and its
 * own send buffer are full, prints "sent N", and then reads nothing until
 * the file "go" exists in its cwd: whatever the peer sends meanwhile stays
 * unread in its receive queue, and the tail of its send queue is never sent.
 *
 * Once "go" exists it writes argv[2] more bytes of its pattern and shuts its
 * writing side, while reading the peer's bytes until EOF, checking each is
 * P(i); it prints "read N ok" (or "bad at OFFSET: GOT != WANT") and
 * "wrote N" and exits.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static unsigned char pattern(uint64_t i) {
    return (unsigned char)(((i * 2654435761u) >> 13) ^ (i >> 9));
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void nap(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000};
    nanosleep(&t, NULL);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: tcpkeeper PORT MORE\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    uint64_t more = strtoull(argv[2], NULL, 10);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4))
        die("bind/listen");
    printf("tcpkeeper listening on port %s\n", argv[1]);
    int c = accept(l, NULL, NULL);
    if (c < 0)
        die("accept");
    int small = 16384;
    setsockopt(c, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    fcntl(c, F_SETFL, fcntl(c, F_GETFL) | O_NONBLOCK);

    /* Fill: write until EAGAIN has held for 300 ms. */
    uint64_t sent = 0;
    unsigned char buf[65536];
    int idle = 0;
    while (idle < 30) {
        for (size_t k = 0; k < sizeof buf; k++)
            buf[k] = pattern(sent + k) ^ 0x5a;
        ssize_t n = write(c, buf, sizeof buf);
        if (n > 0) {
            sent += n;
            idle = 0;
        } else if (n < 0 && errno == EAGAIN) {
            idle++;
            nap(10);
        } else
            die("write");
    }
    printf("sent %llu\n", (unsigned long long)sent);

    while (access("go", F_OK) != 0)
        nap(10);

    uint64_t got = 0, target = sent + more;
    int wdone = 0, rdone = 0;
    while (!wdone || !rdone) {
        struct pollfd p = {c, (short)((rdone ? 0 : POLLIN) | (wdone ? 0 : POLLOUT)), 0};
        if (poll(&p, 1, 60000) <= 0)
            die("poll");
        if (!wdone && (p.revents & (POLLOUT | POLLERR))) {
            size_t len = sizeof buf;
            if (target - sent < len)
                len = target - sent;
            for (size_t k = 0; k < len; k++)
                buf[k] = pattern(sent + k) ^ 0x5a;
            ssize_t n = len ? write(c, buf, len) : 0;
            if (n < 0 && errno != EAGAIN)
                die("write after go");
            if (n > 0)
                sent += n;
            if (sent == target) {
                shutdown(c, SHUT_WR);
                wdone = 1;
            }
        }
        if (!rdone && (p.revents & (POLLIN | POLLHUP | POLLERR))) {
            ssize_t n = read(c, buf, sizeof buf);
            if (n < 0 && errno != EAGAIN)
                die("read after go");
            if (n == 0)
                rdone = 1;
            for (ssize_t k = 0; k < n; k++, got++)
                if (buf[k] != pattern(got)) {
                    printf("bad at %llu: %u != %u\n", (unsigned long long)got, buf[k],
                           pattern(got));
                    return 1;
                }
        }
    }
    printf("read %llu ok\nwrote %llu\n", (unsigned long long)got, (unsigned long long)sent);
    return 0;
}
