/* A process with a lot of memory that knows what it should hold, for tests
 * that interrupt snapshots: fills 200 MiB (argv[2] MiB if given) with a
 * pattern derived from each word's index, then answers every connection on
 * the TCP port argv[1] with
 *   sum=HEX intact=1
 * after reading all of it again (intact=0 if any word differs from its
 * pattern). Prints "ready" once the memory is filled.
 */
#define _GNU_SOURCE
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

static uint64_t pattern(uint64_t i) { return (i + 1) * 0x9e3779b97f4a7c15ULL ^ (i >> 7); }

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 19401;
    size_t mib = argc > 2 ? strtoul(argv[2], NULL, 10) : 200;
    size_t words = mib * (1 << 20) / sizeof(uint64_t);
    uint64_t *mem = mmap(NULL, words * sizeof *mem, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
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
        uint64_t sum = 0;
        int intact = 1;
        for (size_t i = 0; i < words; i++) {
            sum = sum * 31 + mem[i];
            if (mem[i] != pattern(i)) intact = 0;
        }
        char line[64];
        int n = snprintf(line, sizeof line, "sum=%016llx intact=%d\n", (unsigned long long)sum, intact);
        if (write(c, line, n) != n) perror("write");
        close(c);
    }
}
