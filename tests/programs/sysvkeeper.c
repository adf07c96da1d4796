/* A process holding System V IPC objects, for snapshot/restore tests: a
 * shared memory segment (attached, with a pattern in it), a semaphore set
 * with values 1,2,3, and a message queue with two messages queued. It
 * listens on the TCP port given as argv[1]; each connection sends one
 * command and gets one line:
 *
 *   state   -> keys=K shmid=I semid=I msqid=I shmaddr=0xA shm=TEXT sem=A,B,C
 *   share   -> writes through a second attachment of the segment, then
 *              reads through the first: shared=TEXT
 *   consume -> takes every queued message: msgs=T:TEXT,T:TEXT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <unistd.h>

#define SHM_KEY 0x5eed
#define SEM_KEY 0x5eee
#define MSG_KEY 0x5eef
#define SHM_SIZE (3 * 4096 + 100)

struct msg {
    long mtype;
    char text[64];
};

static int shmid, semid, msqid;
static char *shm;

static void answer(int c, const char *cmd) {
    char out[512];
    if (strncmp(cmd, "state", 5) == 0) {
        unsigned short v[3];
        if (semctl(semid, 0, GETALL, v) != 0) v[0] = v[1] = v[2] = 0;
        snprintf(out, sizeof out,
                 "keys=%x,%x,%x shmid=%d semid=%d msqid=%d shmaddr=%p shm=%.16s tail=%.8s sem=%u,%u,%u\n",
                 SHM_KEY, SEM_KEY, MSG_KEY, shmid, semid, msqid, (void *)shm, shm,
                 shm + SHM_SIZE - 8, v[0], v[1], v[2]);
    } else if (strncmp(cmd, "share", 5) == 0) {
        char *second = shmat(shmid, NULL, 0);
        if (second == (void *)-1) {
            snprintf(out, sizeof out, "shared=error %s\n", strerror(errno));
        } else {
            memcpy(second, "via-second-attach", 17);
            shmdt(second);
            snprintf(out, sizeof out, "shared=%.17s\n", shm);
        }
    } else if (strncmp(cmd, "consume", 7) == 0) {
        int n = snprintf(out, sizeof out, "msgs=");
        struct msg m;
        ssize_t len;
        while ((len = msgrcv(msqid, &m, sizeof m.text, 0, IPC_NOWAIT)) >= 0)
            n += snprintf(out + n, sizeof out - n, "%s%ld:%.*s", n > 5 ? "," : "", m.mtype,
                          (int)len, m.text);
        snprintf(out + n, sizeof out - n, "\n");
    } else {
        snprintf(out, sizeof out, "unknown command\n");
    }
    if (write(c, out, strlen(out)) < 0) return;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 9000;

    shmid = shmget(SHM_KEY, SHM_SIZE, IPC_CREAT | IPC_EXCL | 0640);
    semid = semget(SEM_KEY, 3, IPC_CREAT | IPC_EXCL | 0600);
    msqid = msgget(MSG_KEY, IPC_CREAT | IPC_EXCL | 0620);
    if (shmid < 0 || semid < 0 || msqid < 0) {
        perror("creating System V objects");
        return 1;
    }
    shm = shmat(shmid, NULL, 0);
    if (shm == (void *)-1) {
        perror("shmat");
        return 1;
    }
    memcpy(shm, "segment-pattern!", 16);
    memcpy(shm + SHM_SIZE - 8, "the-tail", 8);
    unsigned short values[3] = {1, 2, 3};
    if (semctl(semid, 0, SETALL, values) != 0) {
        perror("SETALL");
        return 1;
    }
    struct msg first = {1, "first"}, second = {2, "second"};
    if (msgsnd(msqid, &first, 5, 0) != 0 || msgsnd(msqid, &second, 6, 0) != 0) {
        perror("msgsnd");
        return 1;
    }

    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 16) != 0) {
        perror("listening");
        return 1;
    }
    printf("sysvkeeper listening on port %d\n", port);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        char cmd[32] = {0};
        if (read(c, cmd, sizeof cmd - 1) > 0) answer(c, cmd);
        close(c);
    }
}
