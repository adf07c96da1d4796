/* A parent and its child sharing a pipe and a MAP_SHARED anonymous page:
 * every 50 ms the parent bumps a counter in the shared page and then writes
 * the same number into the pipe; the child reads each number and checks the
 * page holds at least it. The child appends "ok N" (or "MISMATCH") to the
 * file named by argv[1]. Both also hold 8 MiB of private memory written
 * before the fork and never again: shared copy-on-write between them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define BIG (8 << 20)

int main(int argc, char **argv) {
    if (argc != 2)
        return 2;
    int p[2];
    if (pipe(p) != 0)
        return 1;
    volatile long *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                                 MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED)
        return 1;
    char *big = malloc(BIG);
    for (long i = 0; i < BIG; i++)
        big[i] = (char)(i * 7);
    pid_t child = fork();
    if (child < 0)
        return 1;
    if (child == 0) {
        close(p[1]);
        FILE *log = fopen(argv[1], "a");
        if (!log)
            return 1;
        setvbuf(log, NULL, _IOLBF, 0);
        long n;
        for (;;) {
            ssize_t got = read(p[0], &n, sizeof n);
            if (got != sizeof n) {
                fprintf(log, "EOF %zd\n", got);
                return 1;
            }
            long sum = 0;
            for (long i = 0; i < BIG; i += 4096)
                sum += big[i];
            if (*shared >= n && big[12345] == (char)(12345 * 7))
                fprintf(log, "ok %ld\n", n);
            else
                fprintf(log, "MISMATCH page %ld pipe %ld sum %ld\n", *shared, n, sum);
        }
    }
    close(p[0]);
    for (long n = 1;; n++) {
        *shared = n;
        if (write(p[1], &n, sizeof n) != sizeof n)
            return 1;
        usleep(50000);
    }
}
