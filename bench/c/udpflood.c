/* Bounded UDP sender for bench_xdp: sends 64-byte datagrams from SRC to DST:PORT with
 * sendmmsg in batches of 64, for at most SECONDS and at most COUNT packets, then prints how
 * many it sent. Only the bench's own namespace addresses (198.18.0.0/15) are used. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static double now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
	if (argc != 6) {
		fprintf(stderr, "usage: udpflood SRC DST PORT SECONDS COUNT\n");
		return 2;
	}
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	struct sockaddr_in src = {.sin_family = AF_INET}, dst = {.sin_family = AF_INET};
	inet_pton(AF_INET, argv[1], &src.sin_addr);
	inet_pton(AF_INET, argv[2], &dst.sin_addr);
	dst.sin_port = htons(atoi(argv[3]));
	if (bind(fd, (struct sockaddr *)&src, sizeof src) || connect(fd, (struct sockaddr *)&dst, sizeof dst)) {
		perror("udpflood");
		return 1;
	}
	double seconds = atof(argv[4]);
	long count = atol(argv[5]), sent = 0;
	char payload[64] = {0};
	struct iovec iov = {payload, sizeof payload};
	struct mmsghdr batch[64];
	memset(batch, 0, sizeof batch);
	for (int i = 0; i < 64; i++) {
		batch[i].msg_hdr.msg_iov = &iov;
		batch[i].msg_hdr.msg_iovlen = 1;
	}
	double start = now(), elapsed = 0;
	while (sent < count && (elapsed = now() - start) < seconds) {
		int n = sendmmsg(fd, batch, 64, 0);
		if (n > 0) sent += n;
	}
	printf("%ld %.6f\n", sent, now() - start);
	return 0;
}
