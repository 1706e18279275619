/* CBatonLinux: the Linux calls Swift's Glibc module cannot see (it is built
 * without _GNU_SOURCE) and the CMSG_* macros. One thin function per call; all
 * error handling and logic live in Swift (BatonSystem). Each returns what libc
 * returns and leaves errno as libc left it. */
#ifndef CBATON_LINUX_H
#define CBATON_LINUX_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

static const unsigned int CBATON_SPLICE_F_MOVE = 0x01;
static const unsigned int CBATON_SPLICE_F_NONBLOCK = 0x02;
static const unsigned int CBATON_SPLICE_F_GIFT = 0x08;
static const unsigned int CBATON_MFD_CLOEXEC = 0x0001U;
static const unsigned int CBATON_MFD_ALLOW_SEALING = 0x0002U;
static const int CBATON_MADV_HUGEPAGE = 14;
static const int CBATON_MADV_DONTNEED = 4;
static const int CBATON_MADV_POPULATE_WRITE = 23;
static const int CBATON_MADV_POPULATE_READ = 22;
static const int CBATON_IOV_MAX = 1024;

ssize_t cbaton_vmsplice(int fd, const struct iovec *iov, unsigned long nr_segs, unsigned int flags);
ssize_t cbaton_splice(int fd_in, int fd_out, size_t len, unsigned int flags);
int cbaton_memfd_create(const char *name, unsigned int flags);
int cbaton_set_pipe_size(int fd, int size);
int cbaton_get_pipe_size(int fd);
int cbaton_pipe_bytes_queued(int fd, int *bytes);
ssize_t cbaton_process_vm_readv(pid_t pid, const struct iovec *local, unsigned long liovcnt,
                                const struct iovec *remote, unsigned long riovcnt);
pid_t cbaton_gettid(void);
/* sendmsg with up to max_fds descriptors in one SCM_RIGHTS control message. */
ssize_t cbaton_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);
/* recvmsg; received descriptors (made O_CLOEXEC) go to fds_out, their count to *nfds.
 * *truncated is set when the kernel dropped descriptors (MSG_CTRUNC). */
ssize_t cbaton_recv_with_fds(int sock, void *buf, size_t len, int *fds_out, int max_fds,
                             int *nfds, int *truncated);
int cbaton_peer_credentials(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid);
int cbaton_pin_current_thread(int cpu);
int cbaton_name_current_thread(const char *name);
int cbaton_punch_hole(int fd, off_t offset, off_t len);
int cbaton_mincore(void *addr, size_t length, unsigned char *vec);
int cbaton_pipe2_cloexec(int fds[2]);
int cbaton_accept_cloexec(int sock);
/* posix_spawn of `path` in a new session (POSIX_SPAWN_SETSID), stdout+stderr to log_fd. */
int cbaton_spawn_session(int *pid, const char *path, char *const argv[], char *const envp[], int log_fd);
/* pidfd_open(2) + pidfd_getfd(2): a duplicate of descriptor `fd` of process `pid`, or -1. */
int cbaton_pidfd_open(pid_t pid);
int cbaton_pidfd_getfd(int pidfd, int fd);
/* setns(2) with CLONE_NEWNS: join the mount namespace open at `fd`. */
int cbaton_setns_mount(int fd);
/* posix_spawn in a new session with descriptors `from[i]` placed at `to[i]` (and nothing else
 * above stdio, which is /dev/null in and `log_fd` out). */
int cbaton_spawn_with_fds(int *pid, const char *path, char *const argv[], char *const envp[], int log_fd,
                          const int *from, const int *to, int count);
#endif
