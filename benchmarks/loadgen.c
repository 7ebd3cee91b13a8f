// SPDX-License-Identifier: Apache-2.0
/*
 * loadgen: a native loopback TCP load generator for benchmarks/run.
 *
 *   loadgen MODE [-t THREADS] [-d SECONDS] [-r RATE] [-s BYTES] [-c PORT]
 *
 * MODE
 *   churn   each op: socket, connect, send a request, read the response, close
 *   rr      each op: one request/response on the thread's persistent connection
 *   bulk    each op: one 64 KiB write on the thread's persistent connection
 *
 * Without -c the same process runs the server: THREADS worker threads that each
 * accept a connection and serve it to EOF (so the server never creates a thread
 * per connection). With -c PORT the clients connect to 127.0.0.1:PORT instead.
 * -r paces the clients to RATE ops/s in total (0: as fast as possible).
 *
 * Prints one JSON line: {"mode":…,"threads":…,"seconds":…,"ops":…,"ops_per_s":…}.
 * Meant to run in a private network namespace (unshare --net) with lo up.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BULK_CHUNK 65536

enum mode { CHURN, RR, BULK };

static enum mode mode;
static int threads = 2;
static double duration_s = 3.0;
static double rate;
static size_t msg_bytes = 64;
static int port;
static atomic_int go;
static atomic_int stop;
static atomic_uint_fast64_t errors;

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int read_full(int fd, char *buf, size_t n)
{
	size_t got = 0;

	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);

		if (r <= 0)
			return -1;
		got += (size_t)r;
	}
	return 0;
}

static int write_full(int fd, const char *buf, size_t n)
{
	size_t done = 0;

	while (done < n) {
		ssize_t w = write(fd, buf + done, n - done);

		if (w <= 0)
			return -1;
		done += (size_t)w;
	}
	return 0;
}

static int listen_on(int p)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(p),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(sa);
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		die("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || listen(fd, 4096))
		die("bind/listen");
	if (getsockname(fd, (struct sockaddr *)&sa, &len))
		die("getsockname");
	port = ntohs(sa.sin_port);
	return fd;
}

static int dial(void)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		return -1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Serve one connection after another: echo requests (churn, rr), or drain (bulk). */
static void *server_worker(void *arg)
{
	int lfd = (int)(intptr_t)arg;
	char *buf = malloc(BULK_CHUNK);
	int one = 1;

	for (;;) {
		int fd = accept(lfd, NULL, NULL);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			die("accept");
		}
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		if (mode == BULK) {
			while (read(fd, buf, BULK_CHUNK) > 0)
				;
		} else {
			while (read_full(fd, buf, msg_bytes) == 0 && write_full(fd, buf, msg_bytes) == 0)
				;
		}
		close(fd);
	}
	return NULL;
}

struct client {
	pthread_t thread;
	uint64_t ops;
	double rate;	/* this thread's ops/s, 0: unpaced */
};

static void pace(uint64_t start, uint64_t ops, double per_s)
{
	struct timespec ts;
	uint64_t due;

	if (per_s <= 0)
		return;
	due = start + (uint64_t)((double)ops * 1e9 / per_s);
	ts.tv_sec = (time_t)(due / 1000000000ULL);
	ts.tv_nsec = (long)(due % 1000000000ULL);
	clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
}

static void *client_worker(void *arg)
{
	struct client *c = arg;
	char *buf = calloc(1, BULK_CHUNK);
	size_t n = mode == BULK ? BULK_CHUNK : msg_bytes;
	uint64_t start;
	int fd = -1;

	while (!atomic_load(&go))
		;
	start = now_ns();
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		pace(start, c->ops, c->rate);
		if (fd < 0 && (fd = dial()) < 0) {
			atomic_fetch_add(&errors, 1);
			continue;
		}
		if (write_full(fd, buf, n) || (mode != BULK && read_full(fd, buf, n))) {
			atomic_fetch_add(&errors, 1);
			close(fd);
			fd = -1;
			continue;
		}
		if (mode == CHURN) {
			close(fd);
			fd = -1;
		}
		c->ops++;
	}
	if (fd >= 0)
		close(fd);
	return NULL;
}

static void usage(void)
{
	fprintf(stderr, "usage: loadgen churn|rr|bulk [-t THREADS] [-d SECONDS] [-r RATE] "
			"[-s BYTES] [-c PORT]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	struct client *clients;
	int connect_port = 0, opt;
	uint64_t t0, t1, total = 0;
	struct timespec ts;

	if (argc < 2)
		usage();
	if (!strcmp(argv[1], "churn"))
		mode = CHURN;
	else if (!strcmp(argv[1], "rr"))
		mode = RR;
	else if (!strcmp(argv[1], "bulk"))
		mode = BULK;
	else
		usage();
	optind = 2;
	while ((opt = getopt(argc, argv, "t:d:r:s:c:")) != -1) {
		switch (opt) {
		case 't': threads = atoi(optarg); break;
		case 'd': duration_s = atof(optarg); break;
		case 'r': rate = atof(optarg); break;
		case 's': msg_bytes = (size_t)atol(optarg); break;
		case 'c': connect_port = atoi(optarg); break;
		default: usage();
		}
	}
	if (threads < 1 || msg_bytes < 1 || msg_bytes > BULK_CHUNK || duration_s <= 0)
		usage();
	signal(SIGPIPE, SIG_IGN);

	if (connect_port) {
		port = connect_port;
	} else {
		int lfd = listen_on(0);

		for (int i = 0; i < threads; i++) {
			pthread_t t;

			if (pthread_create(&t, NULL, server_worker, (void *)(intptr_t)lfd))
				die("pthread_create");
			pthread_detach(t);
		}
	}

	clients = calloc((size_t)threads, sizeof(*clients));
	for (int i = 0; i < threads; i++) {
		clients[i].rate = rate / threads;
		if (pthread_create(&clients[i].thread, NULL, client_worker, &clients[i]))
			die("pthread_create");
	}
	t0 = now_ns();
	atomic_store(&go, 1);
	ts.tv_sec = (time_t)duration_s;
	ts.tv_nsec = (long)((duration_s - (double)ts.tv_sec) * 1e9);
	nanosleep(&ts, NULL);
	atomic_store(&stop, 1);
	for (int i = 0; i < threads; i++) {
		pthread_join(clients[i].thread, NULL);
		total += clients[i].ops;
	}
	t1 = now_ns();
	printf("{\"mode\":\"%s\",\"threads\":%d,\"seconds\":%.4f,\"ops\":%llu,\"ops_per_s\":%.1f,"
	       "\"errors\":%llu}\n",
	       argv[1], threads, (double)(t1 - t0) / 1e9, (unsigned long long)total,
	       (double)total * 1e9 / (double)(t1 - t0), (unsigned long long)atomic_load(&errors));
	fflush(stdout);
	_exit(0);	/* server workers are blocked in accept/read: do not join them */
}
