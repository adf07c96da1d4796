/* A process with argv[2] MiB (default 64) of memory that knows what it
 * should hold, for lazy restore tests: each 8-byte word holds a pattern of
 * its index. It answers each connection on TCP port argv[1] with one line
 * for the request line it reads:
 *   ping   -> "pong" (touches none of the region)
 *   sum    -> "sum=HEX intact=1": every word read from user space
 *   ksum   -> the same, with the region read by the kernel: written to a
 *             pipe page by page (a kernel-mode fault on a missing page)
 *   drop   -> "dropped=1 zero=1": the second half of the region given
 *             back with MADV_DONTNEED, then every byte of it read
 *             (zero=0 if any is not zero); the sums then expect zeros there
 *   fork   -> the same as sum, computed by a child forked for it
 * Prints "ready" once the memory is filled.
 */
#define _GNU_SOURCE
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static uint64_t *mem;
static size_t words;
static int dropped;

static uint64_t pattern(uint64_t i) { return (i + 1) * 0x9e3779b97f4a7c15ULL ^ (i >> 7); }

static uint64_t expected(size_t i) { return dropped && i >= words / 2 ? 0 : pattern(i); }

static void sum_of(const uint64_t *src, size_t from, size_t n, uint64_t *sum, int *intact) {
    for (size_t i = 0; i < n; i++) {
        *sum = *sum * 31 + src[i];
        if (src[i] != expected(from + i)) *intact = 0;
    }
}

static int reply_sum(int c, int through_kernel) {
    uint64_t sum = 0;
    int intact = 1;
    if (!through_kernel) {
        sum_of(mem, 0, words, &sum, &intact);
    } else {
        int p[2];
        static uint64_t page[512];
        if (pipe(p) != 0) return -1;
        for (size_t at = 0; at < words; at += 512) {
            if (write(p[1], mem + at, sizeof page) != sizeof page) return -1;
            if (read(p[0], page, sizeof page) != sizeof page) return -1;
            sum_of(page, at, 512, &sum, &intact);
        }
        close(p[0]);
        close(p[1]);
    }
    return dprintf(c, "sum=%016llx intact=%d\n", (unsigned long long)sum, intact);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 19461;
    size_t mib = argc > 2 ? strtoul(argv[2], NULL, 10) : 64;
    words = mib * (1 << 20) / sizeof(uint64_t);
    mem = mmap(NULL, words * sizeof *mem, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 1; }
    for (size_t i = 0; i < words; i++) mem[i] = pattern(i);

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
    printf("ready %zu MiB on port %d\n", mib, port);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        char req[16] = {0};
        ssize_t n = read(c, req, sizeof req - 1);
        if (n > 0 && req[n - 1] == '\n') req[n - 1] = 0;
        if (strcmp(req, "ping") == 0) {
            dprintf(c, "pong\n");
        } else if (strcmp(req, "sum") == 0) {
            reply_sum(c, 0);
        } else if (strcmp(req, "ksum") == 0) {
            if (reply_sum(c, 1) < 0) dprintf(c, "error\n");
        } else if (strcmp(req, "drop") == 0) {
            size_t half = words / 2 * sizeof *mem;
            char *at = (char *)mem + half;
            int ok = madvise(at, half, MADV_DONTNEED) == 0;
            int zero = 1;
            for (size_t i = 0; i < half; i++)
                if (at[i]) { zero = 0; break; }
            dropped = 1;
            dprintf(c, "dropped=%d zero=%d\n", ok, zero);
        } else if (strcmp(req, "fork") == 0) {
            pid_t child = fork();
            if (child == 0) {
                reply_sum(c, 0);
                _exit(0);
            }
            int status;
            waitpid(child, &status, 0);
        } else {
            dprintf(c, "unknown request\n");
        }
        close(c);
    }
}
