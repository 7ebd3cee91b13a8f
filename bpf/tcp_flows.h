/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Types shared by tcp_flows.bpf.c and user space (otel_ebpf_flows/_records.py
 * mirrors them; tests/unit/test_records.py checks the mirror against the BTF
 * in the shipped object). Fixed-width fields, explicit padding, units in names.
 */
#ifndef __TCP_FLOWS_H
#define __TCP_FLOWS_H

#define FLOW_ROLE_CLIENT 1
#define FLOW_ROLE_SERVER 2

#define FLOW_FAMILY_IPV4 4
#define FLOW_FAMILY_IPV6 6
/* family of the reserved keys that collect what no longer fits in the map */
#define FLOW_FAMILY_OVERFLOW 0

enum conn_error {
	CONN_ERR_REFUSED = 0,
	CONN_ERR_TIMED_OUT = 1,
	CONN_ERR_RESET = 2,
	CONN_ERR_HOST_UNREACHABLE = 3,
	CONN_ERR_NET_UNREACHABLE = 4,
	CONN_ERR_OTHER = 5,
	CONN_ERR_MAX = 6,
};

enum close_reason {
	CLOSE_NORMAL = 0,
	CLOSE_RESET_SENT = 1,
	CLOSE_RESET_RECEIVED = 2,
	CLOSE_TIMEOUT = 3,
	CLOSE_OTHER = 4,
	CLOSE_MAX = 5,
};

/* One series of the flows map: a peer as the contract names it. */
struct flow_key {
	__u8 addr[16];	/* peer address; IPv4 stored IPv4-mapped (::ffff:a.b.c.d) */
	__u16 port;	/* client: the peer's (service) port; server: our listening port */
	__u8 family;	/* FLOW_FAMILY_* */
	__u8 role;	/* FLOW_ROLE_* */
};

/* Cumulative since load; never decremented, never deleted by the kernel. */
struct flow_counters {
	__u64 attempts_ok;		/* client: handshakes completed; server: accepted handshakes */
	__u64 attempts_failed[CONN_ERR_MAX];	/* client attempts that ended before ESTABLISHED */
	__u64 adopted;			/* established before instrument(), found by the iterator */
	__u64 closed;			/* established connections that reached CLOSE */
	__u64 closes[CLOSE_MAX];	/* closed connections, by reason, once the reason is final */
	__u64 retrans_segs;		/* segments, SYN and SYN-ACK included */
	__u64 bytes_acked;		/* payload bytes the peer acknowledged */
	__u64 bytes_received;		/* payload bytes received in sequence */
	__u64 resets_sent;
	__u64 resets_received;
	__u64 zero_window_rx;		/* the peer advertised a zero window */
	__u64 zero_window_tx;		/* we advertised a zero window */
	__u64 wscale_disabled;		/* established without window scaling */
	__u64 listen_overflows;		/* server keys with no address: listen-queue drops */
};

/* sock_state.flags */
#define SF_RST_SENT (1 << 0)
#define SF_RST_RECEIVED (1 << 1)
#define SF_PEER_ZERO_WIN (1 << 2)
#define SF_OUR_ZERO_WIN (1 << 3)
#define SF_ESTABLISHED (1 << 4)
#define SF_LISTENER (1 << 5)
#define SF_CLOSED (1 << 6)
#define SF_FINAL (1 << 7)
#define SF_FIN_SENT (1 << 8)
#define SF_PENDING (1 << 9)	/* claim mode: accepted, not yet used by this process */
#define SF_NO_WSCALE (1 << 10)
#define SF_UNSEEN (1 << 11)	/* found established, its handshake seen by no program:
				 * no handshake or connection-duration point */

/*
 * What the kernel keeps per tracked socket (the socks map). User space reads it
 * only to find sockets gone without a word: established, never CLOSE, and not
 * seen by the socket iterator (seen_ns) in the last two passes over their
 * network namespace. See KernelSource._sweep.
 */
struct sock_state {
	struct flow_key key;
	__u16 flags;		/* SF_* */
	__u8 err;		/* sk_err at CLOSE */
	__u8 __pad0;
	__u32 tid;
	__u32 drops;		/* listener: sk_drops already counted */
	__u64 conn_id;
	__u64 start_ns;		/* connect() (client), listen() or ESTABLISHED (server) */
	__u64 established_ns;
	__u64 closed_ns;
	__u64 bytes_acked;	/* already counted */
	__u64 bytes_received;
	__u64 retrans_segs;
	__u64 last_rtt_ns;
	__u32 srtt_us;
	__u32 last_tid;		/* the thread that last sent or received on it */
	__u64 handshake_ns;	/* server in claim mode: reported once claimed */
	__u16 peer_port;	/* the peer's actual port */
	__u8 slot;		/* where note_use() last put it in a thread's slots */
	__u8 __pad1;
	__u32 netns;		/* network namespace inode */
	__u64 seen_ns;		/* when the socket iterator last visited it */
	__u32 conn_later;	/* span enrichment: its CONN record held back while no span
				 * was open (the record's conn_reason + 1), 0 once sent */
	__u32 __pad2;
};

enum flow_event_kind {
	FLOW_EVENT_HANDSHAKE = 1,	/* duration_ns: SYN sent/received -> ESTABLISHED */
	FLOW_EVENT_CLOSE = 2,		/* duration_ns: ESTABLISHED -> CLOSE; reason: enum close_reason */
	FLOW_EVENT_RTT = 3,		/* a smoothed-RTT sample of a live connection */
	/* Span enrichment (the conn_events ring; only when span_mode is set): */
	FLOW_EVENT_CONN = 4,		/* reason: enum conn_reason; duration_ns: the handshake,
					 * 0 when unknown */
	FLOW_EVENT_RETRANSMIT = 5,	/* duration_ns: the number of segments */
	FLOW_EVENT_RESET = 6,		/* reason: enum flow_direction */
	FLOW_EVENT_ZERO_WINDOW = 7,	/* reason: enum flow_direction (receive: the peer's window) */
	FLOW_EVENT_GONE = 8,		/* the socket is gone; its conn_id is never seen again */
};

/* A CONN span record's reason. */
enum conn_reason {
	CONN_ESTABLISHED = 0,		/* its handshake point, if any, is a HANDSHAKE record */
	CONN_ADOPTED = 1,		/* established before span enrichment began */
	CONN_HIST_IN_KERNEL = 2,	/* established; its handshake point is in the hists map */
};

enum flow_direction {
	FLOW_DIR_TRANSMIT = 0,
	FLOW_DIR_RECEIVE = 1,
};

/* A rare per-connection record (ring buffer, or the iterator's output). */
struct flow_event {
	struct flow_key key;
	__u8 kind;		/* enum flow_event_kind */
	__u8 reason;		/* per kind, see enum flow_event_kind */
	__u16 peer_port;	/* the peer's actual port (ephemeral for server connections) */
	__u32 srtt_us;		/* smoothed RTT in microseconds, 0 if none yet */
	__u32 tid;		/* handshake: the thread that connected (client), else 0;
				 * rtt: the thread that last sent or received on it */
	__u64 ts_ns;		/* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
	__u64 duration_ns;
	__u64 conn_id;		/* per-load connection number, 1-based */
};

/*
 * Histograms the kernel aggregates itself (the hists map), once user space
 * turns them on (hist_mode): their points never become ring records. Values in the histogram's kernel unit: ns (handshake, duration),
 * us (rtt); user space divides as it does for records.
 */
enum hist_id {
	HIST_HANDSHAKE = 0,
	HIST_DURATION = 1,
	HIST_RTT = 2,
	HIST_MAX = 3,
};

/* hist_mode bits: which records the kernel aggregates instead */
#define HIST_MODE_HANDSHAKE (1 << 0)	/* FLOW_EVENT_HANDSHAKE -> HIST_HANDSHAKE */
#define HIST_MODE_CLOSE (1 << 1)	/* FLOW_EVENT_CLOSE (and a late-found connection's
					 * FLOW_EVENT_RTT at close) -> HIST_DURATION, HIST_RTT */
#define HIST_MODE_AUDIT (1 << 2)	/* the records as well (reconciliation: the same
					 * values both ways) */

/* hist_put() results */
#define HIST_PUT_PEER 0		/* into the peer's entry */
#define HIST_PUT_NONE 1		/* no entry to be had: the caller hands a record over */
#define HIST_PUT_FOLDED 2	/* into the role's overflow entry (the map is full) */

#define HIST_BOUNDS_MAX 31	/* 2^5 - 1: hist_add() searches them in five steps */
#define HIST_BUCKETS (HIST_BOUNDS_MAX + 1)

/* hist_bounds[hist] (global): bucket i holds values <= bound[i] (and above bound[i - 1]);
 * the last of the n + 1 buckets, the values above bound[n - 1], as the SDK's buckets do.
 * Every bound is below 2^63; those past the n used are 2^63 - 1 (no value lies above them). */
struct hist_bounds {
	__u64 bound[HIST_BOUNDS_MAX];
};

/* Smallest and largest value of one generation (hist_gen, tagged hist_gen + 1):
 * user space moves to the next generation, then reads the one before. */
struct hist_extremes {
	__u64 gen;
	__u64 min;
	__u64 max;
};

/* Counts and sum cumulative since the entry was made (user space takes the
 * difference; bucket counts wrap at 2^32), extremes per generation. */
struct hist_value {
	__u64 sum;
	struct hist_extremes ext[2];	/* [gen & 1] */
	__u32 buckets[HIST_BUCKETS];
};

/* A peer's histograms (the hists map's value, keyed by its flow_key; the
 * overflow key of the role once the map is full). */
struct hist_set {
	struct hist_value hist[HIST_MAX];	/* [enum hist_id] */
};

enum probe_stat {
	STAT_EVENTS_LOST = 0,		/* ring buffer full: a flow_event was dropped */
	STAT_SOCKS_FULL = 1,		/* a connection could not be tracked: socks map full */
	STAT_FLOWS_FOLDED = 2,		/* a counter went to the overflow key: flows map full */
	STAT_SYN_WAIT_MISSED = 3,	/* a server handshake whose SYN time was not found */
	STAT_LISTENERS_FULL = 4,	/* a listener could not be registered: its connections go unseen */
	STAT_CONN_EVENTS_LOST = 5,	/* conn_events ring full: a span-enrichment record was dropped */
	STAT_RETRANS_UNSEEN = 6,	/* retransmitted segments whose event no program ran for,
					 * found later in tcp_sock.total_retrans (and counted then) */
	STAT_HANDSHAKE_UNSEEN = 7,	/* connections found established whose ESTABLISHED no
					 * program ran for (and counted then) */
	STAT_SYNACKS_FULL = 8,		/* a request's SYN-ACK retransmit not kept in synacks */
	STAT_CHILD_DISCARDED = 9,	/* a socket created for a request on our listener (counted
					 * in Tcp.PassiveOpens) closed before ESTABLISHED, e.g. the
					 * loser of two CPUs completing the same request: no
					 * handshake completed, nothing lost (reconciliation only) */
	STAT_CLOSE_UNSEEN = 10,		/* an established connection whose close no program saw,
					 * found when its socket's address was reused for a new
					 * socket: counted closed, reason _OTHER */
	STAT_HISTS_FOLDED = 11,	/* a handshake or a close whose histogram values went to the
				 * overflow key: hists map full */
	STAT_MAX = 12,
};

/* synacks map: the SYN-ACK retransmits counted for one connection request,
 * until its socket is established (its total_retrans starts at the request's
 * count: the difference is what no program ran for). */
struct synack_key {
	__u8 addr[16];	/* the peer, as flow_key.addr */
	__u16 peer_port;
	__u16 local_port;
	__u32 netns;
};

struct synack_count {
	__u64 last_ns;	/* the latest one (user space drops entries of dead requests) */
	__u32 segs;
	__u32 __pad0;
};

/*
 * Hooks with a nested copy (all but HOOK_PROBE, whose skipped runs are caught
 * up at the connection's next segment). The kernel runs a tracing program at most once at a
 * time per CPU: an event raised while the program is already running on that
 * CPU (a softirq that interrupted it in process context) skips it, counted
 * only in the program's recursion_misses. Each of these hooks has a second
 * program on the same tracepoint that handles exactly those events (with tp_btf,
 * by a tail call into the main program's code; else a full copy of it); user
 * space reports misses - rescued[hook] as lost.
 */
enum hook_id {
	HOOK_SET_STATE = 0,
	HOOK_DESTROY_SOCK = 1,
	HOOK_RETRANSMIT_SKB = 2,
	HOOK_RETRANSMIT_SYNACK = 3,
	HOOK_SEND_RESET = 4,
	HOOK_RECEIVE_RESET = 5,
	HOOK_PROBE = 6,
	HOOK_MAX = 7,
};

/* Connections a thread used lately (span enrichment): the slot of a connection
 * is refreshed on every send and receive; the least recently used slot goes. */
#define THREAD_SLOTS 16

struct thread_slot {
	__u64 conn_id;
	__u64 last_ns;		/* CLOCK_MONOTONIC of the latest send or receive */
	__u32 srtt_us;		/* the connection's smoothed RTT then */
	__u32 __pad0;
};

struct thread_conns {
	struct thread_slot slot[THREAD_SLOTS];
};

#endif /* __TCP_FLOWS_H */
