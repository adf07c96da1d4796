/* Every kind of object a whole application may hold, set up around a
 * fork, for snapshot/restore tests: the parent and its child share a file
 * description (one offset), a stream socketpair split between them with
 * bytes unread both ways, a System V segment (attached in both), a
 * semaphore set and a message queue, a POSIX shm object and a memfd mapped
 * shared in both; the parent alone holds a named Unix listener with a
 * pending connection, a timerfd armed for 2 s, a signalfd with SIGUSR1
 * pending, an inotify watch on the shared file and an ITIMER_REAL of 3 s.
 *
 * The child serves requests the parent puts into the POSIX shm object
 * (named argv[2]). The parent listens on 127.0.0.1:argv[1] (cwd: where its
 * files go); one command per connection:
 *   state   -> timerfd=N signals=N alarms=N inotify=N sem=A,B,C shm=TEXT
 *              memfd=TEXT msgs=N child=PID
 *   sp      -> what each side reads from its end of the socketpair:
 *              parent=BYTES child=BYTES
 *   offset  -> the parent reads one byte of the shared file, the child
 *              another: parent=C child=C pos=N
 *   accept  -> accepts the pending connection, whose client then sends a
 *              word: pending=TEXT
 *   msgs    -> takes the queued messages: msgs=TEXT,TEXT
 *   signal  -> reads the signalfd if a signal waits: signals=N (the count)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* The command area both processes map: a request flag, then answers. */
struct area {
    volatile int request; /* 1: read the socketpair; 2: read the file */
    volatile int done;
    char got[64];
};

static volatile sig_atomic_t alarms;
static void on_alarm(int sig) {
    (void)sig;
    alarms++;
}

static int file_fd, sp_fd, sysv_id, sem_id, msg_id;
static char *sysv, *mem;
static struct area *area;

static void child_loop(void) {
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (;;) {
        if (area->request == 1) {
            ssize_t n = recv(sp_fd, area->got, sizeof area->got - 1, MSG_DONTWAIT);
            area->got[n > 0 ? n : 0] = 0;
            memcpy(mem, "child-was-here", 14);
            area->request = 0;
            area->done = 1;
        } else if (area->request == 2) {
            char c = '?';
            if (read(file_fd, &c, 1) != 1) c = '!';
            area->got[0] = c;
            area->got[1] = 0;
            area->request = 0;
            area->done = 1;
        }
        nanosleep(&ts, NULL);
    }
}

/* Asks the child for `request` and waits for its answer. */
static const char *ask_child(int request) {
    area->done = 0;
    area->request = request;
    for (int i = 0; i < 2000 && !area->done; i++) usleep(1000);
    return area->done ? area->got : "no-answer";
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 9000;

    file_fd = open("shared.txt", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (file_fd < 0 || write(file_fd, "0123456789abcdef", 16) != 16) return 1;
    lseek(file_fd, 4, SEEK_SET);

    int sp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) != 0) return 1;

    sysv_id = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    sem_id = semget(IPC_PRIVATE, 3, IPC_CREAT | 0600);
    msg_id = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
    if (sysv_id < 0 || sem_id < 0 || msg_id < 0) return 1;
    sysv = shmat(sysv_id, NULL, 0);
    if (sysv == (void *)-1) return 1;
    strcpy(sysv, "sysv-segment");
    unsigned short values[3] = {7, 8, 9};
    if (semctl(sem_id, 0, SETALL, values) != 0) return 1;
    struct {
        long mtype;
        char text[16];
    } m1 = {1, "one"}, m2 = {2, "two"};
    if (msgsnd(msg_id, &m1, 3, 0) != 0 || msgsnd(msg_id, &m2, 3, 0) != 0) return 1;

    const char *shm_name = argc > 2 ? argv[2] : "/wholekeeper";
    int shm_fd = shm_open(shm_name, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (shm_fd < 0 || ftruncate(shm_fd, 4096) != 0) return 1;
    area = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, shm_fd, 0);
    close(shm_fd);
    int mfd = memfd_create("wholekeeper", MFD_CLOEXEC);
    if (area == MAP_FAILED || mfd < 0 || ftruncate(mfd, 4096) != 0) return 1;
    mem = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (mem == MAP_FAILED) return 1;
    memcpy(mem, "memfd-untouched", 15);

    pid_t child = fork();
    if (child == 0) {
        close(sp[0]);
        sp_fd = sp[1];
        if (send(sp_fd, "child-to-parent", 15, 0) != 15) _exit(1);
        child_loop();
    }
    close(sp[1]);
    sp_fd = sp[0];
    close(mfd);
    if (send(sp_fd, "parent-to-child", 15, 0) != 15) return 1;

    /* A listener with one connection waiting to be accepted. */
    int lis = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    strcpy(un.sun_path, "listener.sock");
    unlink(un.sun_path);
    int cli = socket(AF_UNIX, SOCK_STREAM, 0);
    if (bind(lis, (struct sockaddr *)&un, sizeof un) != 0 || listen(lis, 4) != 0 ||
        connect(cli, (struct sockaddr *)&un, sizeof un) != 0)
        return 1;

    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
    struct itimerspec two = {.it_value = {2, 0}};
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, NULL);
    int sfd = signalfd(-1, &usr1, SFD_CLOEXEC);
    int ifd = inotify_init1(IN_CLOEXEC);
    if (tfd < 0 || sfd < 0 || ifd < 0 || inotify_add_watch(ifd, "shared.txt", IN_MODIFY) != 1)
        return 1;
    raise(SIGUSR1);
    signal(SIGALRM, on_alarm);
    struct itimerval three = {.it_value = {3, 0}};
    if (timerfd_settime(tfd, 0, &two, NULL) != 0 || setitimer(ITIMER_REAL, &three, NULL) != 0)
        return 1;

    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 16) != 0) return 1;
    printf("wholekeeper listening on port %d\n", port);
    fflush(stdout);

    unsigned long timer_fired = 0, signals = 0, events = 0;
    for (;;) {
        /* The signalfd is read only when asked: its signal stays pending. */
        struct pollfd p[4] = {{s, POLLIN, 0}, {tfd, POLLIN, 0}, {-1, 0, 0}, {ifd, POLLIN, 0}};
        if (poll(p, 4, 100) < 0 && errno != EINTR) return 1;
        if (p[1].revents & POLLIN) {
            unsigned long long n;
            if (read(tfd, &n, sizeof n) == sizeof n) timer_fired += n;
        }
        if (p[3].revents & POLLIN) {
            char buf[4096];
            ssize_t n = read(ifd, buf, sizeof buf);
            for (char *e = buf; n > 0 && e < buf + n;) {
                struct inotify_event *ev = (struct inotify_event *)e;
                if (ev->wd == 1) events++;
                e += sizeof *ev + ev->len;
            }
        }
        if (!(p[0].revents & POLLIN)) continue;
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        char cmd[32] = {0}, out[512];
        if (read(c, cmd, sizeof cmd - 1) <= 0) {
            close(c);
            continue;
        }
        if (strncmp(cmd, "state", 5) == 0) {
            unsigned short v[3] = {0, 0, 0};
            semctl(sem_id, 0, GETALL, v);
            struct msqid_ds q;
            msgctl(msg_id, IPC_STAT, &q);
            snprintf(out, sizeof out,
                     "timerfd=%lu signals=%lu alarms=%d inotify=%lu sem=%u,%u,%u shm=%.12s memfd=%.15s "
                     "msgs=%lu child=%d\n",
                     timer_fired, signals, (int)alarms, events, v[0], v[1], v[2], sysv, mem,
                     (unsigned long)q.msg_qnum, (int)child);
        } else if (strncmp(cmd, "sp", 2) == 0) {
            char got[64] = {0};
            ssize_t n = recv(sp_fd, got, sizeof got - 1, MSG_DONTWAIT);
            got[n > 0 ? n : 0] = 0;
            snprintf(out, sizeof out, "parent=%s child=%s\n", got, ask_child(1));
        } else if (strncmp(cmd, "offset", 6) == 0) {
            char mine = '?';
            if (read(file_fd, &mine, 1) != 1) mine = '!';
            const char *theirs = ask_child(2);
            /* Writing moves nothing the others read, but tells inotify. */
            if (pwrite(file_fd, "X", 1, 15) != 1) mine = '!';
            snprintf(out, sizeof out, "parent=%c child=%s pos=%ld\n", mine, theirs,
                     (long)lseek(file_fd, 0, SEEK_CUR));
        } else if (strncmp(cmd, "accept", 6) == 0) {
            int acc = accept4(lis, NULL, NULL, SOCK_NONBLOCK);
            char got[32] = {0};
            ssize_t n = -1;
            if (acc >= 0 && send(cli, "waiting", 7, 0) == 7) n = recv(acc, got, sizeof got - 1, 0);
            got[n > 0 ? n : 0] = 0;
            snprintf(out, sizeof out, "pending=%s\n", acc < 0 ? "none" : got);
            if (acc >= 0) close(acc);
        } else if (strncmp(cmd, "signal", 6) == 0) {
            struct pollfd w = {sfd, POLLIN, 0};
            struct signalfd_siginfo si;
            if (poll(&w, 1, 0) == 1 && read(sfd, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR1)
                signals++;
            snprintf(out, sizeof out, "signals=%lu\n", signals);
        } else if (strncmp(cmd, "msgs", 4) == 0) {
            int n = snprintf(out, sizeof out, "msgs=");
            struct {
                long mtype;
                char text[16];
            } m;
            ssize_t len;
            while ((len = msgrcv(msg_id, &m, sizeof m.text, 0, IPC_NOWAIT)) >= 0)
                n += snprintf(out + n, sizeof out - n, "%s%.*s", n > 5 ? "," : "", (int)len, m.text);
            snprintf(out + n, sizeof out - n, "\n");
        } else {
            snprintf(out, sizeof out, "unknown\n");
        }
        if (write(c, out, strlen(out)) < 0) {
        }
        close(c);
    }
}
