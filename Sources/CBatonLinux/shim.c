#define _GNU_SOURCE
#include "CBatonLinux.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

ssize_t cbaton_vmsplice(int fd, const struct iovec *iov, unsigned long nr_segs, unsigned int flags) {
    return vmsplice(fd, iov, nr_segs, flags);
}

ssize_t cbaton_splice(int fd_in, int fd_out, size_t len, unsigned int flags) {
    return splice(fd_in, NULL, fd_out, NULL, len, flags);
}

int cbaton_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }
int cbaton_set_pipe_size(int fd, int size) { return fcntl(fd, F_SETPIPE_SZ, size); }
int cbaton_get_pipe_size(int fd) { return fcntl(fd, F_GETPIPE_SZ); }
int cbaton_pipe_bytes_queued(int fd, int *bytes) { return ioctl(fd, FIONREAD, bytes); }

ssize_t cbaton_process_vm_readv(pid_t pid, const struct iovec *local, unsigned long liovcnt,
                                const struct iovec *remote, unsigned long riovcnt) {
    return process_vm_readv(pid, local, liovcnt, remote, riovcnt, 0);
}

#define CBATON_MAX_FDS 64

ssize_t cbaton_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    if (nfds < 0 || nfds > CBATON_MAX_FDS) { errno = EINVAL; return -1; }
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    union { char buf[CMSG_SPACE(sizeof(int) * CBATON_MAX_FDS)]; struct cmsghdr align; } control;
    if (nfds > 0) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL);
}

ssize_t cbaton_recv_with_fds(int sock, void *buf, size_t len, int *fds_out, int max_fds,
                             int *nfds, int *truncated) {
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    union { char buf[CMSG_SPACE(sizeof(int) * CBATON_MAX_FDS)]; struct cmsghdr align; } control;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    *nfds = 0;
    *truncated = 0;
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    if (msg.msg_flags & MSG_CTRUNC) *truncated = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *data = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            if (*nfds < max_fds) fds_out[(*nfds)++] = data[i];
            else { close(data[i]); *truncated = 1; }
        }
    }
    return n;
}

int cbaton_peer_credentials(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    int r = getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len);
    if (r == 0) { *pid = cred.pid; *uid = cred.uid; *gid = cred.gid; }
    return r;
}

int cbaton_pin_current_thread(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

int cbaton_punch_hole(int fd, off_t offset, off_t len) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
}

int cbaton_mincore(void *addr, size_t length, unsigned char *vec) { return mincore(addr, length, vec); }

int cbaton_pipe2_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }
int cbaton_accept_cloexec(int sock) { return accept4(sock, NULL, NULL, SOCK_CLOEXEC); }

#include <signal.h>
#include <spawn.h>
extern char **environ;
/* posix_spawn with `actions` in a new session, an empty signal mask and default dispositions: a
 * child spawned from a thread that blocks signals (dispatch workers block SIGTERM, SIGUSR1, ...)
 * must not inherit that, or it would never see SIGTERM or a vCPU kick. Destroys `actions`. */
static int spawn_in_session(int *pid, const char *path, char *const argv[], char *const envp[], posix_spawn_file_actions_t *actions) {
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &all);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    pid_t child = 0;
    int rc = posix_spawn(&child, path, actions, &attr, argv, envp ? envp : environ);
    posix_spawn_file_actions_destroy(actions);
    posix_spawnattr_destroy(&attr);
    *pid = child;
    return rc;
}

int cbaton_spawn_session(int *pid, const char *path, char *const argv[], char *const envp[], int log_fd) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, log_fd, 1);
    posix_spawn_file_actions_adddup2(&actions, log_fd, 2);
    /* Only stdio: no descriptor some other thread happened to hold open leaks into the child. */
    posix_spawn_file_actions_addclosefrom_np(&actions, 3);
    return spawn_in_session(pid, path, argv, envp, &actions);
}

int cbaton_name_current_thread(const char *name) { return pthread_setname_np(pthread_self(), name); }

#include <sys/syscall.h>
#include <sched.h>
int cbaton_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }
int cbaton_pidfd_getfd(int pidfd, int fd) { return (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0); }
int cbaton_setns_mount(int fd) { return setns(fd, CLONE_NEWNS); }

int cbaton_spawn_with_fds(int *pid, const char *path, char *const argv[], char *const envp[], int log_fd,
                          const int *from, const int *to, int count) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, log_fd, 1);
    posix_spawn_file_actions_adddup2(&actions, log_fd, 2);
    for (int i = 0; i < count; i++) posix_spawn_file_actions_adddup2(&actions, from[i], to[i]);
    return spawn_in_session(pid, path, argv, envp, &actions);
}
pid_t cbaton_gettid(void) { return gettid(); }
