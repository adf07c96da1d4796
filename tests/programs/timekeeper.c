/* A process holding timers and notification fds, for snapshot/restore
 * tests. At start it arms, in this order:
 *   - a periodic timerfd (CLOCK_MONOTONIC, every 100 ms), never read until
 *     asked, so its expirations pile up as ticks;
 *   - after 600 ms: a one-shot timerfd (TFD_NONBLOCK|TFD_CLOEXEC) for 2 s;
 *   - a signalfd for SIGUSR1 (blocked), with one SIGUSR1 sent to itself
 *     and left pending;
 *   - an inotify fd watching argv[2] (a file: wd 1), a directory that is
 *     watched and unwatched again (wd 2, a gap), and argv[3] (a directory:
 *     wd 3);
 *   - ITIMER_REAL for 3 s, with a SIGALRM handler counting;
 *   - a POSIX timer (CLOCK_MONOTONIC, SIGEV_SIGNAL SIGUSR2, value 0x5eed)
 *     for 2.5 s, created after two others were created and deleted, so its
 *     id is not the first one.
 * With argv[4] "cancel-on-set" it also holds a timerfd armed with
 * TFD_TIMER_CANCEL_ON_SET, which appshot cannot save. It then prints one
 * line
 *   ready periodic_at=MS armed_at=MS ready_at=MS wd_file=1 wd_dir=3 timer_id=ID
 * (MS: CLOCK_MONOTONIC in milliseconds; the one-shot timers were all armed
 * between armed_at and ready_at) and serves TCP on argv[1]. Each
 * connection drains the signalfd and the periodic timerfd and gets:
 *   oneshot=N oneshot_at=MS oneshot_flags=nb,ce periodic=N sigusr1=N
 *   alarms=N alarm_at=MS ptimer=N ptimer_at=MS ptimer_id=ID ptimer_val=HEX
 *   ptimer_gettime=ERRNO (0: the timer exists) inotify=WD:MASK:NAME,... mono=MS
 * with every count cumulative since start.
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
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

static long long mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static volatile sig_atomic_t alarms, ptimer_fired;
static volatile long long alarm_at, ptimer_at;
static volatile int ptimer_seen_id;
static volatile long ptimer_seen_val;

static void on_alarm(int sig) {
    (void)sig;
    alarms++;
    alarm_at = mono_ms();
}

static void on_timer(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    ptimer_fired++;
    ptimer_at = mono_ms();
    ptimer_seen_id = si->si_timerid;
    ptimer_seen_val = (long)si->si_value.sival_ptr;
}

static char events[1024];

static void read_inotify(int fd) {
    char buf[4096] __attribute__((aligned(8)));
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) {
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *e = (struct inotify_event *)p;
            size_t used = strlen(events);
            if (used + 64 + e->len < sizeof events)
                snprintf(events + used, sizeof events - used, "%s%d:%x:%s", used ? "," : "", e->wd,
                         e->mask, e->len ? e->name : "");
            p += sizeof *e + e->len;
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    int port = atoi(argv[1]);

    int periodic = timerfd_create(CLOCK_MONOTONIC, 0);
    struct itimerspec every = {{0, 100 * 1000 * 1000}, {0, 100 * 1000 * 1000}};
    timerfd_settime(periodic, 0, &every, NULL);
    long long periodic_at = mono_ms();
    usleep(600 * 1000);

    int oneshot = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct itimerspec once = {{0, 0}, {2, 0}};
    timerfd_settime(oneshot, 0, &once, NULL);
    long long armed_at = mono_ms();

    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, NULL);
    int sfd = signalfd(-1, &usr1, SFD_NONBLOCK);
    kill(getpid(), SIGUSR1);

    char gap[] = "/tmp/timekeeper-gap-XXXXXX";
    if (!mkdtemp(gap)) return 1;
    int ifd = inotify_init1(IN_NONBLOCK);
    int wd_file = inotify_add_watch(ifd, argv[2], IN_MODIFY);
    int wd_gap = inotify_add_watch(ifd, gap, IN_CREATE);
    inotify_rm_watch(ifd, wd_gap);
    rmdir(gap);
    int wd_dir = inotify_add_watch(ifd, argv[3], IN_CREATE | IN_MODIFY);
    read_inotify(ifd); /* the IN_IGNORED of the gap */
    events[0] = 0;

    signal(SIGALRM, on_alarm);
    struct itimerval it = {{0, 0}, {3, 0}};
    setitimer(ITIMER_REAL, &it, NULL);

    struct sigaction sa = {0};
    sa.sa_sigaction = on_timer;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGUSR2, &sa, NULL);
    struct sigevent sev = {0};
    sev.sigev_notify = SIGEV_SIGNAL;
    sev.sigev_signo = SIGUSR2;
    sev.sigev_value.sival_ptr = (void *)0x5eed;
    timer_t spare[2], timer;
    for (int i = 0; i < 2; i++) timer_create(CLOCK_MONOTONIC, &sev, &spare[i]);
    for (int i = 0; i < 2; i++) timer_delete(spare[i]);
    timer_create(CLOCK_MONOTONIC, &sev, &timer);
    struct itimerspec in25 = {{0, 0}, {2, 500 * 1000 * 1000}};
    timer_settime(timer, 0, &in25, NULL);

    if (argc > 4 && strcmp(argv[4], "cancel-on-set") == 0) {
        int rt = timerfd_create(CLOCK_REALTIME, 0);
        struct itimerspec far = {{0, 0}, {time(NULL) + 3600, 0}};
        if (timerfd_settime(rt, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, &far, NULL) != 0) return 1;
    }

    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 16) != 0) {
        perror("bind/listen");
        return 1;
    }
    printf("ready periodic_at=%lld armed_at=%lld ready_at=%lld wd_file=%d wd_dir=%d timer_id=%d\n",
           periodic_at, armed_at, mono_ms(), wd_file, wd_dir, (int)(long)timer);
    fflush(stdout);

    unsigned long long oneshot_n = 0, periodic_n = 0;
    long long oneshot_at = 0;
    int sigusr1 = 0;
    for (;;) {
        struct pollfd p[3] = {{s, POLLIN, 0}, {oneshot, POLLIN, 0}, {ifd, POLLIN, 0}};
        if (poll(p, 3, -1) < 0) continue;
        if (p[1].revents & POLLIN) {
            unsigned long long n;
            if (read(oneshot, &n, sizeof n) == sizeof n) {
                oneshot_n += n;
                oneshot_at = mono_ms();
            }
        }
        if (p[2].revents & POLLIN) read_inotify(ifd);
        if (!(p[0].revents & POLLIN)) continue;
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        struct signalfd_siginfo si;
        while (read(sfd, &si, sizeof si) == sizeof si)
            if (si.ssi_signo == SIGUSR1) sigusr1++;
        fcntl(periodic, F_SETFL, O_NONBLOCK);
        unsigned long long n;
        if (read(periodic, &n, sizeof n) == sizeof n) periodic_n += n;
        struct itimerspec left;
        int got = timer_gettime(timer, &left) == 0 ? 0 : errno;
        int fl = fcntl(oneshot, F_GETFL), fdfl = fcntl(oneshot, F_GETFD);
        char out[2048];
        int len = snprintf(out, sizeof out,
                           "oneshot=%llu oneshot_at=%lld oneshot_flags=%s,%s periodic=%llu sigusr1=%d "
                           "alarms=%d alarm_at=%lld ptimer=%d ptimer_at=%lld ptimer_id=%d "
                           "ptimer_val=%lx ptimer_gettime=%d inotify=%s mono=%lld\n",
                           oneshot_n, oneshot_at, fl & O_NONBLOCK ? "nb" : "b",
                           fdfl & FD_CLOEXEC ? "ce" : "noce", periodic_n, sigusr1, (int)alarms,
                           (long long)alarm_at, (int)ptimer_fired, (long long)ptimer_at,
                           ptimer_seen_id, ptimer_seen_val, got, events,
                           mono_ms());
        write(c, out, len);
        close(c);
    }
}
