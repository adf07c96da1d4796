/* A parent and a child sharing a memfd and a POSIX shared memory object,
 * for snapshot/restore tests. The parent creates a sealed memfd, writes
 * into it and maps it shared, opens a POSIX shm object (shm_open, a file
 * in /dev/shm named by argv[2]) and maps it shared, then forks. The child
 * copies the first 16 bytes of its mapping of the memfd into bytes 16-31 of
 * the shm object every 5 ms, so what the parent writes into the memfd
 * through its fd comes back through the child and the shm object.
 *
 * It listens on 127.0.0.1:argv[1]; one command per connection:
 *   state    -> fd=… map=… shm=… echo=… seals=N size=N child=PID
 *   write X  -> writes X (up to 16 bytes) at offset 0 of the memfd by fd
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SIZE 8192

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 9000;
    const char *shm_name = argc > 2 ? argv[2] : "/memfdkeeper";

    int mfd = memfd_create("keeper-memfd", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mfd < 0 || ftruncate(mfd, SIZE) != 0 || pwrite(mfd, "memfd-content!!!", 16, 0) != 16 ||
        pwrite(mfd, "tail", 4, SIZE - 4) != 4 || fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
        perror("memfd");
        return 1;
    }
    char *map = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    int sfd = shm_open(shm_name, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (map == MAP_FAILED || sfd < 0 || ftruncate(sfd, 4096) != 0) {
        perror("mapping");
        return 1;
    }
    char *shm = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (shm == MAP_FAILED) {
        perror("shm mmap");
        return 1;
    }
    memcpy(shm, "posix-shm-bytes!", 16);

    pid_t child = fork();
    if (child == 0) {
        struct timespec ts = {0, 5 * 1000 * 1000};
        for (;;) {
            memcpy(shm + 16, map, 16);
            nanosleep(&ts, NULL);
        }
    }

    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 16) != 0) {
        perror("listening");
        kill(child, SIGKILL);
        return 1;
    }
    printf("memfdkeeper listening on port %d\n", port);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        char cmd[64] = {0}, out[256];
        if (read(c, cmd, sizeof cmd - 1) <= 0) {
            close(c);
            continue;
        }
        if (strncmp(cmd, "write ", 6) == 0) {
            size_t n = strcspn(cmd + 6, "\n");
            if (n > 16) n = 16;
            char buf[16];
            memset(buf, '.', sizeof buf);
            memcpy(buf, cmd + 6, n);
            snprintf(out, sizeof out, "%s\n", pwrite(mfd, buf, 16, 0) == 16 ? "written" : "error");
        } else {
            char by_fd[17] = {0}, tail[5] = {0};
            struct stat st;
            if (pread(mfd, by_fd, 16, 0) != 16 || pread(mfd, tail, 4, SIZE - 4) != 4 ||
                fstat(mfd, &st) != 0)
                strcpy(by_fd, "error");
            snprintf(out, sizeof out, "fd=%s map=%.16s tail=%s shm=%.16s echo=%.16s seals=%d size=%lld child=%d\n",
                     by_fd, map, tail, shm, shm + 16, fcntl(mfd, F_GET_SEALS), (long long)st.st_size,
                     (int)child);
        }
        if (write(c, out, strlen(out)) < 0) {
        }
        close(c);
    }
}
