/*
 * An attacker inside a runv container (tests/vsock_isolation.rs): tries to
 * reach the agent's vsock ports (1024 ttrpc, 1026 stdio, 1027
 * port-forward) at CID 1 (loopback), CID 2 (the host) and the guest's own
 * CID, and on any connection sends a ttrpc Check request and waits for an
 * answer.
 *
 *   vsock-probe [UID]   with UID: drop to that uid and gid (and no groups,
 *                       and so no capabilities) first
 *
 * One line per attempt: "attempt cid=C port=P: failed: <error>" or
 * "attempt cid=C port=P: CONNECTED; rpc: <what came back>", then "done".
 * Built static at test time (cc -static), so it runs in a busybox image.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <grp.h>

/* The guest CID runv's hypervisors give a pod VM. */
#define RUNV_GUEST_CID 3

static unsigned own_cid(void)
{
	unsigned cid;
	int fd = open("/dev/vsock", O_RDONLY);
	if (fd >= 0 && ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) == 0) {
		close(fd);
		printf("own cid %u (from /dev/vsock)\n", cid);
		return cid;
	}
	printf("own cid %u (runv's; /dev/vsock: %s)\n", RUNV_GUEST_CID, strerror(errno));
	return RUNV_GUEST_CID;
}

/* Appends a protobuf length-delimited field. */
static size_t field(uint8_t *out, unsigned number, const char *value)
{
	size_t len = strlen(value);
	out[0] = (uint8_t)(number << 3 | 2);
	out[1] = (uint8_t)len;
	memcpy(out + 2, value, len);
	return 2 + len;
}

/* Sends ttrpc's Request{service, method} for runv.agent.Agent/Check and
 * says what came back within 3 s. */
static void try_rpc(int fd)
{
	uint8_t frame[128];
	size_t len = 10;
	len += field(frame + len, 1, "runv.agent.Agent");
	len += field(frame + len, 2, "Check");
	uint32_t payload = (uint32_t)(len - 10);
	/* Header: length, stream id 1 (a client's are odd), type 1 (request), flags 0. */
	uint8_t header[10] = { payload >> 24, payload >> 16, payload >> 8, payload, 0, 0, 0, 1, 1, 0 };
	memcpy(frame, header, sizeof header);
	if (write(fd, frame, len) != (ssize_t)len) {
		printf("rpc: send failed: %s\n", strerror(errno));
		return;
	}
	struct pollfd p = { .fd = fd, .events = POLLIN };
	if (poll(&p, 1, 3000) <= 0) {
		printf("rpc: no answer\n");
		return;
	}
	uint8_t answer[256];
	ssize_t got = read(fd, answer, sizeof answer);
	if (got > 0)
		printf("rpc: ANSWERED with %zd bytes\n", got);
	else
		printf("rpc: closed without an answer (%s)\n", got < 0 ? strerror(errno) : "eof");
}

static void attempt(unsigned cid, unsigned port)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (fd < 0) {
		printf("attempt cid=%u port=%u: failed: socket: %s\n", cid, port, strerror(errno));
		return;
	}
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
	if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
		printf("attempt cid=%u port=%u: failed: %s\n", cid, port, strerror(errno));
	} else {
		printf("attempt cid=%u port=%u: CONNECTED; ", cid, port);
		fflush(stdout);
		try_rpc(fd);
	}
	close(fd);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc > 1) {
		unsigned id = (unsigned)atoi(argv[1]);
		if (setgroups(0, NULL) || setgid(id) || setuid(id)) {
			printf("cannot drop to uid %u: %s\n", id, strerror(errno));
			return 1;
		}
	}
	printf("probing as uid %u\n", (unsigned)getuid());
	unsigned cids[] = { VMADDR_CID_LOCAL, VMADDR_CID_HOST, own_cid() };
	unsigned ports[] = { 1024, 1026, 1027 };
	for (size_t c = 0; c < sizeof cids / sizeof *cids; c++)
		for (size_t p = 0; p < sizeof ports / sizeof *ports; p++)
			attempt(cids[c], ports[p]);
	printf("done\n");
	return 0;
}
