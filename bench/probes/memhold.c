/*
 * memhold: a process holding MIB MiB of touched, non-zero memory, for the
 * snapshot, restore and clone benchmarks.
 *
 *   memhold serve HOST PORT MIB
 *       Allocates MIB MiB and fills it with a pattern (64-bit word i holds
 *       pattern(i), never zero), then listens on HOST:PORT and serves one
 *       request per connection, forever, blocked in accept in between:
 *         "ping" -> "mib=MIB"                 (cheap: the first answer)
 *         "sum"  -> "mib=MIB sum=<16 hex>"    (reads all of the memory)
 *         "write" -> "mib=MIB write_ns_per_page=<ns>"
 *                    (writes one word of every page, putting back the
 *                    word it finds: in a clone, the first write to each
 *                    of the template's pages)
 *       sum is the wrapping sum over i of word[i] * (2i + 1): every word
 *       and its position count, so a page restored wrong or in the wrong
 *       place changes it. The bench computes the expected value itself.
 *       Prints "memhold listening" once it listens.
 *
 *   memhold serve HOST PORT MIB PERCENT
 *       The same, and a second thread writes PERCENT % of the pages every
 *       second, spread evenly over each second and over the memory: each
 *       write puts back the word it finds, so the page is written (what
 *       write tracking sees) and the checksum stays the same.
 *
 *   memhold cow MIB
 *       Allocates and fills MIB MiB as serve does, forks, and the child
 *       writes one word of every page as "write" does: the ordinary
 *       copy-on-write fault of anonymous memory after fork, to compare a
 *       clone's first writes with. Prints "cow_ns_per_page=<ns>".
 *
 *   memhold ask HOST PORT REQUEST WAIT_MS
 *       Connects, retrying every 0.5 ms while the connection is refused
 *       (no instance of the client's AID yet) for up to WAIT_MS; prints
 *       "waiting" at the first refusal, then, once answered,
 *       "answer <the answer>". The bench notes when each line arrives, so
 *       the time to the first answer needs no clock shared between
 *       processes.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

/* splitmix64's finaliser of i + a constant; bench/src/benches/snapshot.rs
 * has the same function. */
static uint64_t pattern(uint64_t i) {
    uint64_t z = i + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return z ? z : 1;
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads up to a newline or EOF into buf (NUL-terminated, newline dropped). */
static ssize_t read_line(int fd, char *buf, size_t cap) {
    size_t len = 0;
    while (len + 1 < cap) {
        ssize_t n = read(fd, buf + len, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0 || buf[len] == '\n')
            break;
        len++;
    }
    buf[len] = '\0';
    return (ssize_t)len;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* Writes one word of each of the pages of mem (putting back the word it
 * finds) and returns the time per page, ns. */
static double write_each_page(uint64_t *mem, size_t words) {
    const size_t words_per_page = 4096 / sizeof(uint64_t);
    size_t pages = words / words_per_page;
    double start = now_ms();
    for (size_t p = 0; p < pages; p++) {
        volatile uint64_t *word = mem + p * words_per_page;
        *word = *word;
    }
    return (now_ms() - start) * 1e6 / (double)pages;
}

static uint64_t *filled(long mib, size_t *words) {
    *words = (size_t)mib * (1 << 20) / sizeof(uint64_t);
    uint64_t *mem = malloc(*words * sizeof *mem);
    if (mem == NULL) {
        perror("malloc");
        return NULL;
    }
    for (size_t i = 0; i < *words; i++)
        mem[i] = pattern(i);
    return mem;
}

static int cow(long mib) {
    size_t words;
    uint64_t *mem = filled(mib, &words);
    if (mem == NULL)
        return 1;
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0) {
        printf("cow_ns_per_page=%.1f\n", write_each_page(mem, words));
        fflush(stdout);
        _exit(0);
    }
    int status;
    if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "memhold cow: the child failed\n");
        return 1;
    }
    return 0;
}

struct writing {
    volatile uint64_t *mem;
    size_t pages;
    double percent;
};

/* Every 10 ms, the next slice of PERCENT/100 of the pages, in a stride
 * that visits every page once before any again. */
static void *writer(void *arg) {
    const struct writing *w = arg;
    const size_t words_per_page = 4096 / sizeof(uint64_t);
    double per_tick = (double)w->pages * w->percent / 100.0 / 100.0;
    double owed = 0;
    size_t next = 0;
    for (;;) {
        struct timespec tick = {0, 10 * 1000 * 1000};
        nanosleep(&tick, NULL);
        owed += per_tick;
        for (; owed >= 1; owed -= 1) {
            volatile uint64_t *word = w->mem + next * words_per_page;
            *word = *word;
            next = (next + 1) % w->pages;
        }
    }
    return NULL;
}

static int serve(const struct sockaddr_in *a, long mib, double percent) {
    size_t words;
    uint64_t *mem = filled(mib, &words);
    if (mem == NULL)
        return 1;
    static struct writing w;
    if (percent > 0) {
        w.mem = mem;
        w.pages = words * sizeof *mem / 4096;
        w.percent = percent;
        pthread_t t;
        if (pthread_create(&t, NULL, writer, &w) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            return 1;
        }
    }

    int fd = listen_on(a, 64);
    if (fd < 0)
        return 1;
    printf("memhold listening\n");
    fflush(stdout);
    for (;;) {
        int c = accept_next(fd);
        if (c < 0)
            return 1;
        char req[32], answer[96];
        if (read_line(c, req, sizeof req) < 0) {
            close(c);
            continue;
        }
        if (strcmp(req, "ping") == 0) {
            snprintf(answer, sizeof answer, "mib=%ld\n", mib);
        } else if (strcmp(req, "sum") == 0) {
            uint64_t sum = 0;
            for (size_t i = 0; i < words; i++)
                sum += mem[i] * (2 * (uint64_t)i + 1);
            snprintf(answer, sizeof answer, "mib=%ld sum=%016llx\n", mib,
                     (unsigned long long)sum);
        } else if (strcmp(req, "write") == 0) {
            snprintf(answer, sizeof answer, "mib=%ld write_ns_per_page=%.1f\n", mib,
                     write_each_page(mem, words));
        } else {
            snprintf(answer, sizeof answer, "unknown request\n");
        }
        if (write_all(c, answer, strlen(answer)) != 0)
            perror("write");
        close(c);
    }
}

static int ask(const struct sockaddr_in *a, const char *request, long wait_ms) {
    double deadline = now_ms() + (double)wait_ms;
    int said_waiting = 0;
    int fd;
    for (;;) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            perror("socket");
            return 1;
        }
        if (connect(fd, (const struct sockaddr *)a, sizeof *a) == 0)
            break;
        int err = errno;
        close(fd);
        if (err != ECONNREFUSED) {
            fprintf(stderr, "connect: %s\n", strerror(err));
            return 1;
        }
        if (!said_waiting) {
            printf("waiting\n");
            fflush(stdout);
            said_waiting = 1;
        }
        if (now_ms() > deadline) {
            fprintf(stderr, "connection still refused after %ld ms\n", wait_ms);
            return 1;
        }
        struct timespec pause = {0, 500000};
        nanosleep(&pause, NULL);
    }
    char line[40];
    snprintf(line, sizeof line, "%s\n", request);
    if (write_all(fd, line, strlen(line)) != 0) {
        perror("write");
        return 1;
    }
    char answer[128];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, answer + len, sizeof answer - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            perror("read");
            return 1;
        }
        if (n == 0 || len + (size_t)n == sizeof answer - 1) {
            len += (size_t)(n > 0 ? n : 0);
            break;
        }
        len += (size_t)n;
    }
    answer[len] = '\0';
    answer[strcspn(answer, "\n")] = '\0';
    if (len == 0) {
        fprintf(stderr, "the server closed without answering\n");
        return 1;
    }
    printf("answer %s\n", answer);
    fflush(stdout);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "cow") == 0 && atol(argv[2]) > 0)
        return cow(atol(argv[2]));
    struct sockaddr_in a;
    if (argc >= 4 && parse_addr(argv[2], argv[3], &a) == 0) {
        if (argc == 5 && strcmp(argv[1], "serve") == 0 && atol(argv[4]) > 0)
            return serve(&a, atol(argv[4]), 0);
        if (argc == 6 && strcmp(argv[1], "serve") == 0 && atol(argv[4]) > 0 && atof(argv[5]) > 0)
            return serve(&a, atol(argv[4]), atof(argv[5]));
        if (argc == 6 && strcmp(argv[1], "ask") == 0 && atol(argv[5]) > 0)
            return ask(&a, argv[4], atol(argv[5]));
    }
    fprintf(stderr,
            "usage: %s serve HOST PORT MIB [PERCENT] | ask HOST PORT REQUEST WAIT_MS | cow MIB\n",
            argv[0]);
    return 2;
}
