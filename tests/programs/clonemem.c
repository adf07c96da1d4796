/* Memory that must stay anonymous in every clone of a template. At start
 * it fills a region of argv[2] MiB (default 64) of anonymous memory with a
 * pattern, a 1 MiB area likewise, and 16 MiB of heap (malloc'd in 64 KiB
 * pieces, the last one kept so the heap cannot shrink) with 0xab bytes,
 * which it then frees. It prints "clonemem listening on port P" and
 * answers each connection on TCP port argv[1] (127.0.0.1) once:
 *
 *   "pattern"  the region and the area still hold their pattern: "ok"
 *              or "FAIL:" and what does not.
 *   "purge"    what an allocator does with memory it gives back, checked
 *              as it trusts it: the region's first half still holds the
 *              pattern (another clone's purge is not ours), MADV_DONTNEED
 *              of it reads zeros, its second half still holds the pattern,
 *              MADV_FREE of the area succeeds, glibc's malloc_trim gives
 *              the freed heap back and a page of it then reads zeros, and
 *              calloc returns zeros; /proc/self/smaps shows the region as
 *              anonymous memory. Answers "ok" or "FAIL:" and each check
 *              that failed.
 *   "host"     its hostname (a clone's own: its UTS namespace's).
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define PAGE 4096
#define PIECE (64 * 1024)
#define PIECES 256

static uint64_t *region;
static size_t region_len;
static uint64_t *area;
static const size_t area_len = 1 << 20;
static char *pieces[PIECES];
static char *freed_page;

static uint64_t pattern(size_t word) { return (word * 0x9e3779b97f4a7c15ULL) | 1; }

static void fill(uint64_t *p, size_t len) {
    for (size_t w = 0; w < len / 8; w++) p[w] = pattern(w);
}

static int holds_pattern(const uint64_t *p, size_t from, size_t len) {
    for (size_t w = from / 8; w < (from + len) / 8; w++)
        if (p[w] != pattern(w)) return 0;
    return 1;
}

static int all_zero(const void *p, size_t len) {
    const unsigned char *b = p;
    for (size_t i = 0; i < len; i++)
        if (b[i]) return 0;
    return 1;
}

/* The smaps header of the mapping at `addr` names no file and inode 0. */
static int anonymous_in_smaps(void *addr) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return 0;
    char line[512];
    int ok = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long start, end, inode;
        char perms[8], dev[16], path[256] = "";
        unsigned long long off;
        if (sscanf(line, "%lx-%lx %7s %llx %15s %lu %255s", &start, &end, perms, &off, dev,
                   &inode, path) < 6)
            continue;
        if (start <= (unsigned long)addr && (unsigned long)addr < end) {
            ok = inode == 0 && path[0] == 0 && perms[3] == 'p';
            break;
        }
    }
    fclose(f);
    return ok;
}

static void answer(int c, const char *text) {
    size_t n = strlen(text);
    while (n > 0) {
        ssize_t w = write(c, text, n);
        if (w <= 0) return;
        text += w;
        n -= w;
    }
}

static void check_pattern(char *out, size_t cap) {
    out[0] = 0;
    if (!holds_pattern(region, 0, region_len)) strncat(out, " region", cap - strlen(out) - 1);
    if (!holds_pattern(area, 0, area_len)) strncat(out, " area", cap - strlen(out) - 1);
}

static void purge(char *out, size_t cap) {
    size_t half = region_len / 2;
    out[0] = 0;
#define FAIL(why) strncat(out, " " why, cap - strlen(out) - 1)
    if (!holds_pattern(region, 0, half)) FAIL("first-half-changed-before-purge");
    if (madvise(region, half, MADV_DONTNEED) != 0) FAIL("dontneed-failed");
    if (!all_zero(region, half)) FAIL("dontneed-not-zero");
    if (!holds_pattern(region, half, region_len - half)) FAIL("second-half-lost-pattern");
    if (madvise(area, area_len, MADV_FREE) != 0) FAIL("madv-free-failed");
    if (!malloc_trim(0)) FAIL("malloc-trim-released-nothing");
    if (!all_zero(freed_page, PAGE)) FAIL("trimmed-heap-not-zero");
    for (int i = 0; i < 64; i++) {
        char *p = calloc(1, PIECE);
        if (!p || !all_zero(p, PIECE)) {
            FAIL("calloc-not-zero");
            break;
        }
    }
    if (!anonymous_in_smaps(region)) FAIL("region-not-anonymous-in-smaps");
#undef FAIL
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 9000;
    size_t mib = argc > 2 ? strtoul(argv[2], NULL, 10) : 64;
    region_len = mib << 20;
    region = mmap(NULL, region_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    area = mmap(NULL, area_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED || area == MAP_FAILED) return 1;
    fill(region, region_len);
    fill(area, area_len);
    /* Heap pieces below the mmap threshold: freed, they coalesce into one
     * free chunk in the middle of the heap, which malloc_trim gives back
     * page by page with MADV_DONTNEED. */
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    for (int i = 0; i < PIECES; i++) {
        pieces[i] = malloc(PIECE);
        if (!pieces[i]) return 1;
        memset(pieces[i], 0xab, PIECE);
    }
    freed_page = (char *)(((uintptr_t)pieces[PIECES / 2] + PAGE - 1) & ~(uintptr_t)(PAGE - 1)) + PAGE;
    for (int i = 0; i < PIECES - 1; i++) free(pieces[i]);

    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) return 1;
    printf("clonemem listening on port %d\n", port);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        char req[64] = {0};
        ssize_t n = read(c, req, sizeof req - 1);
        char fails[512];
        if (n > 0 && strncmp(req, "host", 4) == 0) {
            char host[256] = "";
            gethostname(host, sizeof host - 1);
            answer(c, host);
            answer(c, "\n");
            close(c);
            continue;
        }
        if (n > 0 && strncmp(req, "purge", 5) == 0)
            purge(fails, sizeof fails);
        else
            check_pattern(fails, sizeof fails);
        if (fails[0])
            answer(c, "FAIL:"), answer(c, fails);
        else
            answer(c, "ok");
        answer(c, "\n");
        close(c);
    }
}
