/* A process whose state cannot be recomputed from its command line, for
 * snapshot/restore tests: a random secret on the heap, worker threads that
 * each advance their own counter, a file with a moved offset, a pipe with
 * unread bytes, and a listening socket on the port given as argv[1].
 *
 * Each connection gets one line:
 *   secret=HEX counters=A,B,C offset=N next=XY pid=P
 * and a connection that sends "pipe\n" first also drains the pipe:
 *   pipe=BYTES
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 3

static volatile unsigned long counters[WORKERS];
static char *secret;
static int file_fd;
static int pipe_fds[2];

static void *worker(void *arg) {
    long i = (long)arg;
    struct timespec ts = {0, 5 * 1000 * 1000};
    for (;;) {
        counters[i]++;
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 9000;
    const char *path = argc > 2 ? argv[2] : "/tmp/statekeeper.data";

    unsigned char raw[16];
    int r = open("/dev/urandom", O_RDONLY);
    if (r < 0 || read(r, raw, sizeof raw) != sizeof raw) return 1;
    close(r);
    secret = malloc(2 * sizeof raw + 1);
    for (size_t i = 0; i < sizeof raw; i++) sprintf(secret + 2 * i, "%02x", raw[i]);

    file_fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (file_fd < 0 || write(file_fd, "0123456789", 10) != 10) return 1;
    lseek(file_fd, 4, SEEK_SET);

    if (pipe(pipe_fds) != 0 || write(pipe_fds[1], "pipe-bytes", 10) != 10) return 1;

    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 64) != 0) {
        perror("bind/listen");
        return 1;
    }
    socklen_t alen = sizeof a;
    getsockname(s, (struct sockaddr *)&a, &alen);
    printf("statekeeper listening on port %d\n", ntohs(a.sin_port));
    fflush(stdout);

    pthread_t t[WORKERS];
    for (long i = 0; i < WORKERS; i++) pthread_create(&t[i], NULL, worker, (void *)i);

    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        char req[16] = {0};
        struct timeval tv = {0, 200 * 1000};
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        ssize_t n = recv(c, req, sizeof req - 1, 0);
        char out[512];
        int len;
        if (n > 0 && strncmp(req, "pipe", 4) == 0) {
            char buf[64] = {0};
            fcntl(pipe_fds[0], F_SETFL, O_NONBLOCK);
            ssize_t got = read(pipe_fds[0], buf, sizeof buf - 1);
            len = snprintf(out, sizeof out, "pipe=%s\n", got > 0 ? buf : "");
        } else {
            off_t off = lseek(file_fd, 0, SEEK_CUR);
            char next[3] = {0};
            pread(file_fd, next, 2, off);
            len = snprintf(out, sizeof out, "secret=%s counters=%lu,%lu,%lu offset=%ld next=%s pid=%d\n",
                           secret, counters[0], counters[1], counters[2], (long)off, next, getpid());
        }
        write(c, out, len);
        close(c);
    }
}
