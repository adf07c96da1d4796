/* A process that never stops writing its memory, for pre-copy tests: a
 * region of argv[2] MiB (default 64) of 4 KiB pages, each filled with a
 * pattern of (page, version), and a version table. A writer thread picks
 * pages at random and rewrites each with its next version: half from user
 * space, half by read(2) from a pipe (a write the kernel makes, faulting
 * in kernel mode). A checker answers every connection on TCP port argv[1]
 * with
 *   writes=N intact=1 sum=HEX
 * after checking, under the writer's lock, that every page holds exactly
 * the pattern of the version the table gives it (intact=0 otherwise). The
 * writer holds the lock for one page, so a process frozen in the middle of
 * one finishes it first when it runs again. A page copied before a write
 * and not copied again afterwards breaks the check, whichever of page and
 * table it is. Prints "ready" once everything is written once.
 *
 * With argv[3] "churn" the writer also changes its address space: about
 * every 512 writes it maps the whole region anew at the same address
 * (MAP_FIXED: a new mapping, which no earlier write tracking covers) and
 * writes every page back from the table. 16 times the region's size of
 * memory written once, mapped beside it, makes a pre-copy's first pass
 * last long enough for remaps to happen during it.
 *
 * With argv[3] "slow" it writes about 200 pages a second instead: what an
 * incremental snapshot saves is then a small part of the region.
 */
#define _GNU_SOURCE
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint64_t *mem;
static uint64_t *versions;
static size_t pages;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static volatile uint64_t writes;
static int pipefd[2];
static int churn;
static long pause_ns = 50000;

static uint64_t pattern(uint64_t page, uint64_t version, uint64_t word) {
    return (page * 0x9e3779b97f4a7c15ULL) ^ (version << 20) ^ (word * 0xff51afd7ed558ccdULL);
}

static void fill(uint64_t *dst, size_t page, uint64_t version) {
    for (size_t w = 0; w < WORDS; w++) dst[w] = pattern(page, version, w);
}

static void *writer(void *arg) {
    (void)arg;
    uint64_t rng = 88172645463325252ULL;
    uint64_t buf[WORDS];
    for (;;) {
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
        size_t p = rng % pages;
        pthread_mutex_lock(&lock);
        uint64_t v = versions[p] + 1;
        if (churn && rng % 512 == 0) {
            void *again = mmap(mem, pages * PAGE, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            if (again != mem) { perror("mmap fixed"); exit(1); }
            for (size_t q = 0; q < pages; q++) fill(mem + q * WORDS, q, versions[q]);
        }
        if (rng & (1 << 20)) {
            fill(mem + p * WORDS, p, v);
        } else {
            fill(buf, p, v);
            if (write(pipefd[1], buf, PAGE) != PAGE) { perror("write"); exit(1); }
            if (read(pipefd[0], mem + p * WORDS, PAGE) != PAGE) { perror("read"); exit(1); }
        }
        versions[p] = v;
        writes++;
        pthread_mutex_unlock(&lock);
        /* About 20,000 pages a second: many written during every pass. */
        struct timespec ts = {0, pause_ns};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 19402;
    size_t mib = argc > 2 ? strtoul(argv[2], NULL, 10) : 64;
    pages = mib * (1 << 20) / PAGE;
    churn = argc > 3 && strcmp(argv[3], "churn") == 0;
    if (argc > 3 && strcmp(argv[3], "slow") == 0) pause_ns = 5000000;
    if (churn) {
        size_t len = 16 * pages * PAGE;
        char *ballast = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (ballast == MAP_FAILED) { perror("mmap"); return 1; }
        memset(ballast, 0x5a, len);
    }
    mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    versions = mmap(NULL, pages * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED || versions == MAP_FAILED) { perror("mmap"); return 1; }
    if (pipe(pipefd) != 0) { perror("pipe"); return 1; }
    for (size_t p = 0; p < pages; p++) fill(mem + p * WORDS, p, 0);

    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 64) != 0) {
        perror("bind/listen");
        return 1;
    }
    pthread_t t;
    if (pthread_create(&t, NULL, writer, NULL) != 0) { perror("pthread_create"); return 1; }
    printf("ready %zu MiB on port %d\n", mib, port);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        pthread_mutex_lock(&lock);
        uint64_t sum = 0;
        int intact = 1;
        for (size_t p = 0; p < pages; p++) {
            sum = sum * 31 + versions[p];
            for (size_t w = 0; w < WORDS; w++)
                if (mem[p * WORDS + w] != pattern(p, versions[p], w)) intact = 0;
        }
        uint64_t n = writes;
        pthread_mutex_unlock(&lock);
        char line[96];
        int len = snprintf(line, sizeof line, "writes=%llu intact=%d sum=%016llx\n",
                           (unsigned long long)n, intact, (unsigned long long)sum);
        if (write(c, line, len) != len) perror("write");
        close(c);
    }
}
