/* Many threads, each making one notified call and then staying alive, so
 * the supervisor meets as many distinct TIDs as there are threads.
 *
 *   manythreads N            getsockname on a fresh TCP socket, one thread
 *                            at a time (the process holds one socket at most)
 *   manythreads N bind PORT  bind to PORT, all threads at once, each keeping
 *                            its socket: calls that wait for a real port
 *                            pile up in the supervisor
 *
 * Prints one line once every thread has answered, or after 20 s:
 *   answered=N of=M ok=K errno=E:COUNT,...
 * and exits 0 only if every thread got an answer (success or an error).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_ERRNO 256

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cond = PTHREAD_COND_INITIALIZER;
static int answered, ok;
static int errors[MAX_ERRNO];
static int release_pipe[2];
static int bind_port; /* 0: getsockname mode */
static pthread_mutex_t serial = PTHREAD_MUTEX_INITIALIZER;

static int name_call(void) {
    int err = 0;
    pthread_mutex_lock(&serial);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        err = errno;
    } else {
        struct sockaddr_in sin;
        socklen_t len = sizeof sin;
        if (getsockname(fd, (struct sockaddr *)&sin, &len) != 0) err = errno;
        close(fd);
    }
    pthread_mutex_unlock(&serial);
    return err;
}

static int bind_call(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return errno;
    struct sockaddr_in sin = {0};
    sin.sin_family = AF_INET;
    sin.sin_port = htons(bind_port);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    /* Kept open, bound or not, until the process exits. */
    return bind(fd, (struct sockaddr *)&sin, sizeof sin) == 0 ? 0 : errno;
}

static void *worker(void *arg) {
    (void)arg;
    int err = bind_port ? bind_call() : name_call();
    pthread_mutex_lock(&lock);
    answered++;
    if (err == 0)
        ok++;
    else
        errors[err < MAX_ERRNO ? err : 0]++;
    pthread_cond_signal(&done_cond);
    pthread_mutex_unlock(&lock);
    /* Stay alive, so that the next thread's TID is a new one. */
    char c;
    while (read(release_pipe[0], &c, 1) < 0 && errno == EINTR) {
    }
    return NULL;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    if (argc > 3 && strcmp(argv[2], "bind") == 0) bind_port = atoi(argv[3]);
    if (pipe(release_pipe) != 0) return 2;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    int started = 0;
    for (int i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, worker, NULL) != 0) break;
        pthread_detach(t);
        started++;
    }
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 20;
    pthread_mutex_lock(&lock);
    while (answered < started) {
        if (pthread_cond_timedwait(&done_cond, &lock, &deadline) != 0) break;
    }
    printf("answered=%d of=%d ok=%d errno=", answered, n, ok);
    for (int e = 0; e < MAX_ERRNO; e++)
        if (errors[e]) printf("%d:%d,", e, errors[e]);
    printf("\n");
    fflush(stdout);
    int all = answered == n;
    pthread_mutex_unlock(&lock);
    /* Exit without waiting for threads that may never get an answer. */
    _exit(all ? 0 : 1);
}
