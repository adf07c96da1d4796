/* A vfork child that makes a notified call while it shares its parent's
 * address space, then execs and binds from the same address in its new
 * one, while the parent keeps the old address space alive:
 *
 *   vforkexec P1 P2
 *
 * The parent puts 127.0.0.1:P1 at a fixed address; the vfork child calls
 * getsockname (notified), then execs itself as "stage2 P2", which puts
 * 127.0.0.1:P2 at the same fixed address and binds a TCP socket from
 * there. stage2 prints "bound PORT" with the port getsockname reports: P2,
 * unless whoever read the address read the parent's memory instead.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define FIXED ((void *)0x7e5700000000UL)

static struct sockaddr_in *at_fixed(int port) {
    void *p = mmap(FIXED, 4096, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p != FIXED) {
        perror("mmap");
        exit(2);
    }
    struct sockaddr_in *sin = p;
    sin->sin_family = AF_INET;
    sin->sin_port = htons(port);
    sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return sin;
}

static int stage2(int port) {
    struct sockaddr_in *sin = at_fixed(port);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)sin, sizeof *sin) != 0) {
        perror("stage2 bind");
        return 1;
    }
    struct sockaddr_in got;
    socklen_t len = sizeof got;
    if (getsockname(fd, (struct sockaddr *)&got, &len) != 0) {
        perror("stage2 getsockname");
        return 1;
    }
    printf("bound %d\n", ntohs(got.sin_port));
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "stage2") == 0) return stage2(atoi(argv[2]));
    if (argc != 3) {
        fprintf(stderr, "usage: vforkexec P1 P2\n");
        return 2;
    }
    at_fixed(atoi(argv[1]));
    int probe = socket(AF_INET, SOCK_STREAM, 0);
    char *stage2_argv[] = {argv[0], "stage2", argv[2], NULL};
    pid_t child = vfork();
    if (child == 0) {
        /* Notified while this task shares the parent's address space. */
        struct sockaddr_in name;
        socklen_t len = sizeof name;
        getsockname(probe, (struct sockaddr *)&name, &len);
        execv("/proc/self/exe", stage2_argv);
        _exit(127);
    }
    int status = 0;
    waitpid(child, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
