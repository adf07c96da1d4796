/* A process whose signal actions and resource limits are its own, for the
 * clone tests: SIGUSR1 and SIGCHLD caught, SIGPIPE and SIGHUP ignored, and
 * lowered limits of open files, CPU time and core size. Prints "ready",
 * then "usr1 N" each time its SIGUSR1 handler has run N times, so that a
 * clone's handler can be seen to run.
 *   sigkeeper step   also single-steps itself from then on: the trap flag
 *                    set, an empty SIGTRAP handler run after every
 *                    instruction; "ready" says how many have run. A frozen
 *                    thread's saved flags then have the trap flag on. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static volatile sig_atomic_t usr1;

static void on_usr1(int s) {
    (void)s;
    usr1++;
}

static void on_chld(int s) { (void)s; }

static volatile sig_atomic_t traps;

static void on_trap(int s) {
    (void)s;
    traps++;
}

static int limit(int resource, rlim_t cur, rlim_t max) {
    struct rlimit rl = {cur, max};
    if (setrlimit(resource, &rl) != 0) {
        perror("setrlimit");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    struct rlimit nofile;
    getrlimit(RLIMIT_NOFILE, &nofile);
    if (limit(RLIMIT_NOFILE, 200, nofile.rlim_max) || limit(RLIMIT_CPU, 3000, 4000) ||
        limit(RLIMIT_CORE, 0, 0))
        return 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, 0);
    sa.sa_handler = on_chld;
    sa.sa_flags = SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, 0);
    sa.sa_handler = SIG_IGN;
    sa.sa_flags = 0;
    sigaction(SIGPIPE, &sa, 0);
    sigaction(SIGHUP, &sa, 0);
    if (argc > 1 && strcmp(argv[1], "step") == 0) {
        sa.sa_handler = on_trap;
        sigaction(SIGTRAP, &sa, 0);
        __asm__ volatile("pushfq; orq $0x100, (%%rsp); popfq" ::: "memory", "cc");
        for (volatile int i = 0; i < 10; i++)
            ;
        printf("ready traps=%d\n", (int)traps);
    } else {
        printf("ready\n");
    }
    fflush(stdout);
    int seen = 0;
    for (;;) {
        pause();
        if (usr1 != seen) {
            seen = usr1;
            printf("usr1 %d\n", seen);
            fflush(stdout);
        }
    }
}
