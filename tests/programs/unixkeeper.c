/* A process holding Unix sockets and shared file descriptions in every
 * state a snapshot must keep, for tests/tests/unixsockets.rs:
 *   - a stream socketpair with unread bytes both ways (SO_PASSCRED on one
 *     end, O_NONBLOCK on the other),
 *   - a seqpacket and a datagram socketpair with two queued messages each,
 *   - a listener at the relative path keeper.sock (in its cwd) with one
 *     pending connection from a client socket it holds,
 *   - an abstract listener @unixkeeper-PORT with one accepted connection
 *     whose client's bytes are unread,
 *   - a datagram socket bound to keeper.dgram, an unbound socket,
 *   - a file opened O_CLOEXEC, a dup of it (no CLOEXEC) and a dup3 of it
 *     (O_CLOEXEC), sharing one offset.
 *
 * TCP on 127.0.0.1:argv[1], one line per connection: "ping" answers "pong";
 * "report" checks everything once (reading what was queued) and answers
 *   stream=ok seqpacket=ok dgram=ok pending=ok path=ok abstract=ok
 *   accepted=ok bound=ok unbound=ok opts=ok dup=ok cloexec=1,0,1
 * with "bad:WHY" in place of an "ok" that does not hold. Later reports
 * repeat the first answer.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static int sp[2], qp[2], dp[2], path_l, pending_c, abs_l, acc_client, acc_server, bound_d, unbound;
static int file_f, file_g, file_h;
static struct sockaddr_un abs_addr;
static socklen_t abs_len;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static socklen_t path_addr(struct sockaddr_un *a, const char *p) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    strcpy(a->sun_path, p);
    return offsetof(struct sockaddr_un, sun_path) + strlen(p) + 1;
}

static void setup(int port) {
    struct sockaddr_un a;
    socklen_t len;
    int one = 1;

    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp)) die("socketpair stream");
    if (write(sp[0], "a-to-b", 6) != 6 || write(sp[1], "b-to-a!", 7) != 7) die("write sp");
    setsockopt(sp[0], SOL_SOCKET, SO_PASSCRED, &one, sizeof one);
    fcntl(sp[1], F_SETFL, O_NONBLOCK);

    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, qp)) die("socketpair seqpacket");
    if (send(qp[0], "first", 5, 0) != 5 || send(qp[0], "second!!", 8, 0) != 8) die("send qp");
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, dp)) die("socketpair dgram");
    if (send(dp[1], "one", 3, 0) != 3 || send(dp[1], "two-2", 5, 0) != 5) die("send dp");

    unlink("keeper.sock");
    path_l = socket(AF_UNIX, SOCK_STREAM, 0);
    len = path_addr(&a, "keeper.sock");
    if (bind(path_l, (struct sockaddr *)&a, len) || listen(path_l, 8)) die("path listener");
    chmod("keeper.sock", 0640);
    pending_c = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(pending_c, (struct sockaddr *)&a, len)) die("pending connect");

    abs_l = socket(AF_UNIX, SOCK_STREAM, 0);
    memset(&abs_addr, 0, sizeof abs_addr);
    abs_addr.sun_family = AF_UNIX;
    int n = snprintf(abs_addr.sun_path + 1, sizeof abs_addr.sun_path - 1, "unixkeeper-%d", port);
    abs_len = offsetof(struct sockaddr_un, sun_path) + 1 + n;
    if (bind(abs_l, (struct sockaddr *)&abs_addr, abs_len) || listen(abs_l, 8)) die("abstract listener");
    acc_client = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(acc_client, (struct sockaddr *)&abs_addr, abs_len)) die("abstract connect");
    acc_server = accept(abs_l, NULL, NULL);
    if (acc_server < 0) die("accept");
    if (write(acc_client, "k-bytes", 7) != 7) die("write acc");

    unlink("keeper.dgram");
    bound_d = socket(AF_UNIX, SOCK_DGRAM, 0);
    len = path_addr(&a, "keeper.dgram");
    if (bind(bound_d, (struct sockaddr *)&a, len)) die("bind dgram");
    unbound = socket(AF_UNIX, SOCK_STREAM, 0);

    file_f = open("keeper.data", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (file_f < 0 || write(file_f, "0123456789", 10) != 10) die("data file");
    lseek(file_f, 2, SEEK_SET);
    file_g = dup(file_f);
    file_h = dup3(file_f, 40, O_CLOEXEC);
    if (file_g < 0 || file_h < 0) die("dup");
}

/* Reads one message or run of bytes without blocking; "" when none. */
static const char *take(int fd, char *buf, size_t size) {
    ssize_t n = recv(fd, buf, size - 1, MSG_DONTWAIT);
    buf[n > 0 ? n : 0] = 0;
    return buf;
}

static int empty(int fd) {
    char c;
    return recv(fd, &c, 1, MSG_DONTWAIT) < 0 && errno == EAGAIN;
}

static const char *check_pair(int rd, const char *want1, const char *want2) {
    static char why[128];
    char b[64];
    if (strcmp(take(rd, b, sizeof b), want1) != 0) {
        snprintf(why, sizeof why, "bad:first=%s", b);
        return why;
    }
    if (want2 && strcmp(take(rd, b, sizeof b), want2) != 0) {
        snprintf(why, sizeof why, "bad:second=%s", b);
        return why;
    }
    return empty(rd) ? "ok" : "bad:more";
}

/* Both directions of a connected stream pair carry a word. */
static int talks(int x, int y) {
    char b[8] = {0};
    if (write(x, "ping", 4) != 4 || read(y, b, 4) != 4 || strcmp(b, "ping")) return 0;
    memset(b, 0, sizeof b);
    return write(y, "pong", 4) == 4 && read(x, b, 4) == 4 && !strcmp(b, "pong");
}

static int new_connection(struct sockaddr_un *a, socklen_t len, int listener) {
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)a, len)) return 0;
    int s = accept(listener, NULL, NULL);
    int ok = s >= 0 && talks(c, s);
    close(c);
    close(s);
    return ok;
}

static void report(char *out, size_t size) {
    char stream[160], b[64];
    struct sockaddr_un a, got;
    socklen_t len, glen;
    int v;
    socklen_t vl = sizeof v;

    const char *s1 = check_pair(sp[1], "a-to-b", NULL);
    snprintf(stream, sizeof stream, "%s", s1);
    const char *s2 = check_pair(sp[0], "b-to-a!", NULL);
    if (strcmp(stream, "ok") == 0 && strcmp(s2, "ok") != 0) snprintf(stream, sizeof stream, "%s", s2);
    char seq[160];
    snprintf(seq, sizeof seq, "%s", check_pair(qp[1], "first", "second!!"));
    char dg[160];
    snprintf(dg, sizeof dg, "%s", check_pair(dp[0], "one", "two-2"));

    int p = accept4(path_l, NULL, NULL, SOCK_NONBLOCK);
    const char *pending = p < 0 ? "bad:none" : (fcntl(p, F_SETFL, 0), talks(pending_c, p) ? "ok" : "bad:silent");
    if (p >= 0) close(p);
    len = path_addr(&a, "keeper.sock");
    const char *path = new_connection(&a, len, path_l) ? "ok" : "bad";
    const char *abstract = new_connection(&abs_addr, abs_len, abs_l) ? "ok" : "bad";

    glen = sizeof got;
    const char *accepted = "ok";
    if (getsockname(acc_server, (struct sockaddr *)&got, &glen) || glen != abs_len ||
        memcmp(&got, &abs_addr, abs_len))
        accepted = "bad:name";
    else if (strcmp(take(acc_server, b, sizeof b), "k-bytes") || !empty(acc_server))
        accepted = "bad:bytes";
    else if (!talks(acc_client, acc_server))
        accepted = "bad:silent";

    const char *bound = "ok";
    int sender = socket(AF_UNIX, SOCK_DGRAM, 0);
    len = path_addr(&a, "keeper.dgram");
    if (sendto(sender, "hi", 2, 0, (struct sockaddr *)&a, len) != 2)
        bound = "bad:send";
    else if (strcmp(take(bound_d, b, sizeof b), "hi"))
        bound = "bad:recv";
    close(sender);

    const char *unbound_ok = "ok";
    glen = sizeof got;
    if (getsockopt(unbound, SOL_SOCKET, SO_TYPE, &v, &vl) || v != SOCK_STREAM ||
        getsockname(unbound, (struct sockaddr *)&got, &glen) || glen != sizeof(sa_family_t))
        unbound_ok = "bad";

    const char *opts = "ok";
    vl = sizeof v;
    if (getsockopt(sp[0], SOL_SOCKET, SO_PASSCRED, &v, &vl) || v != 1)
        opts = "bad:passcred";
    else if (!(fcntl(sp[1], F_GETFL) & O_NONBLOCK) || (fcntl(sp[0], F_GETFL) & O_NONBLOCK))
        opts = "bad:nonblock";

    const char *dup_ok = "ok";
    if (read(file_f, b, 2) != 2 || memcmp(b, "23", 2))
        dup_ok = "bad:read";
    else if (lseek(file_g, 0, SEEK_CUR) != 4 || lseek(file_h, 0, SEEK_CUR) != 4)
        dup_ok = "bad:offset";

    snprintf(out, size,
             "stream=%s seqpacket=%s dgram=%s pending=%s path=%s abstract=%s accepted=%s "
             "bound=%s unbound=%s opts=%s dup=%s cloexec=%d,%d,%d\n",
             stream, seq, dg, pending, path, abstract, accepted, bound, unbound_ok, opts, dup_ok,
             !!(fcntl(file_f, F_GETFD) & FD_CLOEXEC), !!(fcntl(file_g, F_GETFD) & FD_CLOEXEC),
             !!(fcntl(file_h, F_GETFD) & FD_CLOEXEC));
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 19800;
    setup(port);

    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) die("bind/listen");
    printf("unixkeeper listening on port %d\n", port);
    fflush(stdout);

    static char answer[1024];
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        char req[16] = {0};
        struct timeval tv = {2, 0};
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        recv(c, req, sizeof req - 1, 0);
        if (strncmp(req, "report", 6) == 0) {
            if (!answer[0]) report(answer, sizeof answer);
            write(c, answer, strlen(answer));
        } else {
            write(c, "pong\n", 5);
        }
        close(c);
    }
}
