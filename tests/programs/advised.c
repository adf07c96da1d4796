/*
 * advised: mappings carrying what madvise, mlock and mmap flags set on
 * them, for the snapshot tests.
 *
 *   advised PORT
 *       Maps seven 4 MiB anonymous regions, fills each with its own
 *       pattern and sets on them:
 *         0: MADV_HUGEPAGE
 *         1: MADV_NOHUGEPAGE, MADV_DONTDUMP
 *         2: MADV_DONTFORK, MADV_SEQUENTIAL
 *         3: MADV_WIPEONFORK, MADV_RANDOM
 *         4: mlock
 *         5: mlock2 MLOCK_ONFAULT
 *         6: MAP_NORESERVE, MADV_MERGEABLE
 *       prints "advised 0=ADDR 1=ADDR ... 6=ADDR" and serves one answer per
 *       connection on 127.0.0.1:PORT:
 *         "contents=ok|bad@N fork=ok|bad:WHY"
 *       contents: every region still holds its pattern; fork: in a child,
 *       region 2 is not mapped (MADV_DONTFORK) and region 3 reads as zeros
 *       (MADV_WIPEONFORK), while region 0 holds its pattern.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define REGIONS 7
#define SIZE (4UL << 20)

static unsigned char *region[REGIONS];

static unsigned char pattern(int r, size_t i) {
    return (unsigned char)(r * 37 + (i >> 12) * 11 + 1);
}

static void fill(int r) {
    for (size_t i = 0; i < SIZE; i += 4096)
        memset(region[r] + i, pattern(r, i), 4096);
}

static int intact(int r) {
    for (size_t i = 0; i < SIZE; i += 4096)
        for (size_t j = 0; j < 4096; j += 512)
            if (region[r][i + j] != pattern(r, i))
                return 0;
    return 1;
}

static void must(int ok, const char *what) {
    if (!ok) {
        perror(what);
        exit(1);
    }
}

/* 0 when the fork behaves as advised; otherwise a code saying what not. */
static int fork_check(void) {
    pid_t child = fork();
    if (child < 0)
        return 9;
    if (child == 0) {
        unsigned char vec[1];
        /* mincore fails with ENOMEM on an address with no mapping. */
        if (mincore(region[2], 4096, vec) == 0 || errno != ENOMEM)
            _exit(1);
        for (size_t i = 0; i < SIZE; i += 4096)
            if (region[3][i] != 0)
                _exit(2);
        if (!intact(0))
            _exit(3);
        _exit(0);
    }
    int status;
    if (waitpid(child, &status, 0) != child || !WIFEXITED(status))
        return 8;
    return WEXITSTATUS(status);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: advised PORT\n");
        return 2;
    }
    for (int r = 0; r < REGIONS; r++) {
        int flags = MAP_PRIVATE | MAP_ANONYMOUS | (r == 6 ? MAP_NORESERVE : 0);
        region[r] = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, flags, -1, 0);
        must(region[r] != MAP_FAILED, "mmap");
    }
    must(madvise(region[0], SIZE, MADV_HUGEPAGE) == 0, "MADV_HUGEPAGE");
    must(madvise(region[1], SIZE, MADV_NOHUGEPAGE) == 0, "MADV_NOHUGEPAGE");
    must(madvise(region[1], SIZE, MADV_DONTDUMP) == 0, "MADV_DONTDUMP");
    must(madvise(region[2], SIZE, MADV_DONTFORK) == 0, "MADV_DONTFORK");
    must(madvise(region[2], SIZE, MADV_SEQUENTIAL) == 0, "MADV_SEQUENTIAL");
    must(madvise(region[3], SIZE, MADV_WIPEONFORK) == 0, "MADV_WIPEONFORK");
    must(madvise(region[3], SIZE, MADV_RANDOM) == 0, "MADV_RANDOM");
    must(madvise(region[6], SIZE, MADV_MERGEABLE) == 0, "MADV_MERGEABLE");
    for (int r = 0; r < REGIONS; r++)
        fill(r);
    must(mlock(region[4], SIZE) == 0, "mlock");
    must(syscall(SYS_mlock2, region[5], SIZE, 1 /* MLOCK_ONFAULT */) == 0, "mlock2");

    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)atoi(argv[1])),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    must(bind(s, (struct sockaddr *)&a, sizeof a) == 0, "bind");
    must(listen(s, 8) == 0, "listen");
    printf("advised");
    for (int r = 0; r < REGIONS; r++)
        printf(" %d=%lx", r, (unsigned long)region[r]);
    printf("\n");
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0)
            continue;
        char answer[128];
        int bad = -1;
        for (int r = 0; r < REGIONS && bad < 0; r++)
            if (!intact(r))
                bad = r;
        int forked = fork_check();
        char contents[16], fork_word[16];
        if (bad < 0)
            snprintf(contents, sizeof contents, "ok");
        else
            snprintf(contents, sizeof contents, "bad@%d", bad);
        if (forked == 0)
            snprintf(fork_word, sizeof fork_word, "ok");
        else
            snprintf(fork_word, sizeof fork_word, "bad:%d", forked);
        int n = snprintf(answer, sizeof answer, "contents=%s fork=%s\n", contents, fork_word);
        if (write(c, answer, (size_t)n) < 0)
            perror("write");
        close(c);
    }
}
