// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * tcp_flows: the kernel's view of one process's TCP connections.
 *
 * Hooks (tp_btf first; raw_tp copies of the same handlers for kernels
 * without BTF-typed tracepoints, chosen by user space with set_autoload):
 *   sock:inet_sock_set_state   ownership, attempts, handshakes, closes, active
 *   tcp:tcp_retransmit_skb     retransmitted segments (2- and 3-argument forms)
 *   tcp:tcp_retransmit_synack  SYN-ACK retransmits on our listeners
 *   tcp:tcp_send_reset         RSTs we send
 *   tcp:tcp_receive_reset      RSTs we receive
 *   tcp:tcp_destroy_sock       final close reason, forgets the socket
 *   tcp:tcp_probe              zero-window transitions (per received segment)
 *   sock:sock_send_length,     which thread used which connection when (span
 *   sock:sock_recv_length      enrichment), and in claim mode which process
 *                              accepted a socket (kernel 6.3+; one program per
 *                              tracepoint for both, attached when either is on)
 *   skb:kfree_skb              drops charged to one of our listeners that were
 *                              no overflow (kernel 6.11+: rx_sk), see listener_drops
 *   iter/tcp                   bytes, RTT samples and listen drops of live
 *                              sockets, and adoption of sockets that existed
 *                              before load (run by the reader thread)
 * Minimum kernel: 5.8 (tp_btf, ring buffer, iter/tcp, ns pid helper).
 *
 * Maps:
 *   socks      sock pointer -> sock_state: the sockets this process owns (user
 *              space also reads it: see sock_state in tcp_flows.h)
 *   listeners  (netns, port) -> listener sock: finds the owner of accepted sockets
 *   flows      flow_key -> flow_counters: cumulative counters per peer; when full,
 *              counters go to the reserved overflow keys user space inserts
 *   events     ring buffer of flow_event, woken only past wakeup_bytes
 *   stats      probe_stat -> count (self-telemetry)
 *   seeds      socket inode -> 1: this process's sockets at load, for adoption
 *   control    [0] = 1 while user space runs the adoption pass;
 *              [1] = 1 in claim mode: a socket accepted on one of our listeners
 *              is counted only once this process reads or writes it, since a
 *              listener shared by several processes (a pre-fork server) says
 *              nothing about which of them will accept the connection;
 *              [2] = 1 once span enrichment is in use (span_mode: a tracer
 *              provider is hooked): until then no conn_events, no thread slots
 *   hists      flow_key -> per histogram: bucket counts, sum, extremes: histogram
 *              points aggregated here instead of handed over one record each;
 *              when full, into the overflow key of the role
 *   .data.hists  (global data, written by user space through its memory map at
 *              run time) hist_mode: which histograms the kernel aggregates
 *              (HIST_MODE_*: where every reader's aggregation takes bucket
 *              counts); hist_gen: the generation of their extremes (see
 *              hist_value); hist_bounds: their bucket bounds in kernel units
 *   conn_events  ring buffer of per-connection records for span enrichment
 *              (connection, retransmit, reset, zero window, gone); read when a
 *              span ends and at each poll, woken only past wakeup_bytes
 *   threads    tid -> the connections the thread used lately (span enrichment)
 *   owned_filter (.bss) counting filter over socks' keys: a slot counts the
 *              tracked sockets whose pointer hashes to it, so most other
 *              sockets on the host are turned away by one load, no map lookup
 *              (an entry user space deletes, a gone socket the sweep found, leaves
 *              its slot counting: only that slot's shortcut is lost)
 *   listen_filter (.bss) the same over the listeners' ports
 *   busy       per CPU, per hook_id: how many runs of the hook's main program
 *              code are under way here (a nested copy's tail call is a second)
 *   rescued    hook_id -> events its nested copy handled (see tcp_flows.h)
 *   jump_<hook> one slot: the hook's main program, for its nested copy's tail call
 *   parents    forked child: sockets its parent counted before the fork, never claimed
 *   synacks    (peer, ports, netns) -> the SYN-ACK retransmits counted for a request
 *              not yet established (see synacks_counted)
 *   preexisting  sock -> identity: sockets established on our listeners before load
 *              that no process had accepted (so not adopted): never taken on as new
 *   evicted    sock -> identity (LRU): accepted sockets not tracked for want of room
 *              in socks (counted as such): never taken on later either
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "tcp_flows.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

#define E2BIG 7
#define ENOMEM 12
#define EBUSY 16
#define ECONNRESET 104
#define ENETUNREACH 101
#define ETIMEDOUT 110
#define ECONNREFUSED 111
#define EHOSTUNREACH 113


/* Set by user space before load. */
const volatile __u32 target_tgid = 0;	/* in the pid namespace below; 0: every process */
const volatile __u64 pidns_dev = 0;
const volatile __u64 pidns_ino = 0;
/* 1: that pid namespace is not the initial one (a container): threads are
 * named by their ids there, the ids the application knows, not the kernel's */
const volatile __u32 ns_tids = 0;
const volatile __u64 wakeup_bytes = 65536;
const volatile __u64 rtt_sample_ns = 5000000000ULL;
const volatile __u32 span_mode = 0;	/* 1: feed conn_events and threads */

/* Set by user space at run time (see .data.hists above). */
__u32 hist_mode SEC(".data.hists") = 0;
__u32 hist_gen SEC(".data.hists") = 0;
/* 1 while no span is open in this process (user space writes it as the first
 * span starts and the last one ends): span records and thread slots wait; a
 * connection's CONN record is sent at its first use or event once one is. */
__u32 spans_idle SEC(".data.hists") = 0;
struct hist_bounds hist_bounds[HIST_MAX] SEC(".data.hists") = {};

__u64 next_conn_id = 0;
/* The target's tgid as the kernel names it (init pid namespace), learned the
 * first time the pid-namespace helper says the current task is the target. */
__u32 target_host_tgid = 0;

/*
 * Cheap rejection of other processes' sockets, on every TCP event of the host.
 * A slot is incremented before a socket is inserted into socks and decremented
 * after it is deleted, so it is never below the number of tracked sockets that
 * hash to it: a zero slot proves the socket untracked (no false negatives); a
 * nonzero one means "look it up". 8192 slots: 32 KiB, cache-resident.
 */
#define OWNED_SLOTS_LOG2 13
#define LISTEN_SLOTS_LOG2 12
__u32 owned_filter[1 << OWNED_SLOTS_LOG2] = {};
__u32 listen_filter[1 << LISTEN_SLOTS_LOG2] = {};

/*
 * Zero-window marks (SF_PEER_ZERO_WIN, SF_OUR_ZERO_WIN) set on tracked
 * sockets: incremented with each mark set, decremented with each mark cleared
 * or forgotten, so never below the number set (a socket user space deletes
 * keeps its marks counted: only the shortcut below is lost). While it is 0, a
 * segment with open windows both ways changes nothing, and tcp_probe (every
 * received segment) returns without looking its socket up.
 */
__u32 zero_win_marks = 0;

/* BTF-typed programs only: the verifier lets no pointer be multiplied, but
 * the distance between two pointers is a number. The raw_tp copies (untyped
 * pointers) neither consult nor maintain the filter. */
static __always_inline __u32 owned_slot(const void *sk)
{
	__u64 x = (__u64)sk - (__u64)&owned_filter;

	asm volatile("" : "+r"(x));	/* keep the subtraction before the multiply */
	return (x * 0x9E3779B97F4A7C15ULL) >> (64 - OWNED_SLOTS_LOG2);
}

static __always_inline __u32 listen_slot(__u16 port)
{
	return ((__u32)port * 0x9E3779B1U) >> (32 - LISTEN_SLOTS_LOG2);
}

/*
 * The filter slot a typed program maintains for `sk`, NO_SLOT for raw_tp. A
 * global function (probe reads, the socket passed as a number, which cannot
 * be hashed as a typed pointer is) takes the slot from its caller instead.
 */
#define NO_SLOT 0xffffffffU

static __always_inline __u32 filter_slot(int direct, const void *sk)
{
	return direct ? owned_slot(sk) : NO_SLOT;
}

static __always_inline bool maybe_tracked(int direct, const void *sk)
{
	return !direct || owned_filter[owned_slot(sk)] != 0;
}


struct listener_key {
	__u32 netns;
	__u16 port;
	__u16 __pad0;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct sock_state);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct listener_key);
	__type(value, __u64);
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct flow_key);
	__type(value, struct flow_counters);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
} seeds SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} conn_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct thread_conns);
} threads SEC(".maps");

/* Keeps struct flow_event in the object's BTF (ring-buffer records are not
 * otherwise described) so tests can check user space's mirror against it. */
struct flow_event *unused_flow_event __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u32);
} control SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct flow_key);
	__type(value, struct hist_set);
} hists SEC(".maps");

/* A forked child: the sockets its parent had already counted as its own when it
 * forked (established on a shared listener before claim mode): never taken on. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
} parents SEC(".maps");

/* Per CPU: 1 while the main program of a hook runs on this CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HOOK_MAX);
	__type(key, __u32);
	__type(value, __u32);
} busy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HOOK_MAX);
	__type(key, __u32);
	__type(value, __u64);
} rescued SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct synack_key);
	__type(value, struct synack_count);
} synacks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u64);
} preexisting SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u64);
} evicted SEC(".maps");

/* When a SYN-ACK retransmit last found synacks full (0: never). A request
 * without an entry then may have had some counted: not repaired for a while. */
__u64 synacks_full_ns = 0;
#define SYNACK_LIFE_NS (180ULL * 1000000000ULL)	/* user space drops older entries */

#define CONTROL_SEEDING 0
#define CONTROL_CLAIM 1
#define CONTROL_SPANS 2

/* How far the SYN-wait lookup walks an accept queue (connections not yet accepted). */
#define ACCEPT_QUEUE_WALK 64

static const struct flow_counters zero_counters;

static __always_inline bool control_on(__u32 idx)
{
	__u32 *v = bpf_map_lookup_elem(&control, &idx);

	return v && *v;
}
static const struct sock_state zero_state;
static const struct thread_conns zero_thread;

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
}

/* Process context only: whether the current task belongs to the target. */
static __always_inline bool owned_by_target(void)
{
	struct bpf_pidns_info ns = {};
	__u32 tgid;

	if (!target_tgid)
		return true;
	tgid = bpf_get_current_pid_tgid() >> 32;
	if (target_host_tgid)	/* a process's pid namespace never changes */
		return tgid == target_host_tgid;
	if (bpf_get_ns_current_pid_tgid(pidns_dev, pidns_ino, &ns, sizeof(ns)) || ns.tgid != target_tgid)
		return false;
	target_host_tgid = tgid;
	return true;
}

/* Process context: the current thread's id as the application knows it
 * (threading.get_native_id()): in a container's pid namespace, not the
 * kernel's; there, one more helper call per use. */
static __always_inline __u32 current_tid(void)
{
	struct bpf_pidns_info ns = {};

	if (ns_tids && !bpf_get_ns_current_pid_tgid(pidns_dev, pidns_ino, &ns, sizeof(ns)))
		return ns.pid;
	return (__u32)bpf_get_current_pid_tgid();
}

/* The socket's state if this process tracks it: the filter first. */
static __always_inline struct sock_state *tracked(int direct, const void *sk)
{
	__u64 skp = (__u64)sk;

	if (!maybe_tracked(direct, sk))
		return NULL;
	return bpf_map_lookup_elem(&socks, &skp);
}

/* listeners, with the same discipline as socks and owned_filter. */
static __always_inline void add_listener(const struct listener_key *lk, __u64 skp)
{
	__u32 slot = listen_slot(lk->port);

	__sync_fetch_and_add(&listen_filter[slot], 1);
	if (bpf_map_update_elem(&listeners, lk, &skp, BPF_ANY)) {
		__sync_fetch_and_sub(&listen_filter[slot], 1);
		stat_inc(STAT_LISTENERS_FULL);
	}
}

static __always_inline void remove_listener(const struct listener_key *lk)
{
	if (!bpf_map_delete_elem(&listeners, lk))
		__sync_fetch_and_sub(&listen_filter[listen_slot(lk->port)], 1);
}

static __always_inline __u64 *find_listener(const struct listener_key *lk)
{
	if (!listen_filter[listen_slot(lk->port)])
		return NULL;
	return bpf_map_lookup_elem(&listeners, lk);
}

static __always_inline struct flow_counters *counters_for(const struct flow_key *key)
{
	struct flow_counters *c = bpf_map_lookup_elem(&flows, key);
	struct flow_key other = {};

	if (c)
		return c;
	bpf_map_update_elem(&flows, key, &zero_counters, BPF_NOEXIST);
	c = bpf_map_lookup_elem(&flows, key);
	if (c)
		return c;
	/* Full: count into the overflow key of this role, so totals stay exact. */
	stat_inc(STAT_FLOWS_FOLDED);
	other.family = FLOW_FAMILY_OVERFLOW;
	other.role = key->role;
	return bpf_map_lookup_elem(&flows, &other);
}

/*
 * Field reads. The tp_btf and iterator programs get BTF-typed pointers the
 * verifier checks, so they read fields with plain loads; the raw_tp copies get
 * untyped pointers and must go through bpf_probe_read_kernel (BPF_CORE_READ), a
 * helper call per field. The handlers take `direct` (READ_*) as a constant at
 * every call site, so each program is compiled with only its own kind of read.
 *
 * READ_CAST adds bpf_rdonly_cast (kernel 6.2+) for memory the verifier cannot
 * type by itself (the TCP header behind skb->data, a listener reached through
 * a pointer kept in a map): a typed read-only view whose loads are plain,
 * fault-checked loads. The kfunc is weak: the tp_btf programs that use it are
 * loaded only where vmlinux BTF has it, and elsewhere their `_nocast` copies
 * (READ_BTF) are, which probe-read those few fields.
 */
#define READ_PROBE 0	/* raw_tp */
#define READ_BTF 1	/* tp_btf, iterator */
#define READ_CAST 2	/* tp_btf with bpf_rdonly_cast */

extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;

#define CAST(type, ptr) ((type *)bpf_rdonly_cast((ptr), bpf_core_type_id_kernel(type)))

/*
 * Global functions (__noinline, not static) are verified once per program,
 * not once per path that reaches them; they take a socket as a number, which
 * each reads as its mode says: a _cast copy (READ_CAST: a typed read-only
 * view, plain loads; for the programs that have bpf_rdonly_cast) and a plain
 * one with probe reads (for the rest). A program calls its own mode's copy.
 */
#define SOCK_VIEW(mode, skp)                                                    \
	((mode) == READ_CAST ? CAST(const struct sock, (void *)(skp)) : (const struct sock *)(skp))
#define CALL_AT(direct, name, ...)                                              \
	((direct) == READ_CAST ? name##_cast(__VA_ARGS__) : name(__VA_ARGS__))

#define RD(direct, src, a, ...)                                                 \
	((direct) ? ___arrow((src), a, ##__VA_ARGS__) : BPF_CORE_READ((src), a, ##__VA_ARGS__))
#define RD_BITFIELD(direct, src, field)                                         \
	((direct) ? BPF_CORE_READ_BITFIELD((src), field) : BPF_CORE_READ_BITFIELD_PROBED((src), field))

/* tcp_sock fields lie past struct sock: a direct read needs the checked cast. */
static __always_inline const struct tcp_sock *tcp_of(int direct, const struct sock *sk)
{
	/* READ_CAST: only ever asked of a TCP socket (tracked ones are: track()) */
	if (direct == READ_CAST)
		return CAST(const struct tcp_sock, sk);
	return direct ? bpf_skc_to_tcp_sock((void *)sk) : (const struct tcp_sock *)sk;
}

#define COUNT(key, field, n)                                            \
	do {                                                            \
		struct flow_counters *__c = counters_for(key);          \
		if (__c)                                                \
			__sync_fetch_and_add(&__c->field, (n));         \
	} while (0)

/* COUNT into *cp, the counters of `key` looked up at most once per program
 * run (a handler that counts several things for one socket passes the same
 * cp along: one flows lookup instead of one per field). */
#define COUNT_INTO(cp, key, field, n)                                   \
	do {                                                            \
		if (!*(cp))                                             \
			*(cp) = counters_for(key);                      \
		if (*(cp))                                              \
			__sync_fetch_and_add(&(*(cp))->field, (n));     \
	} while (0)

/*
 * Bring the socket's retransmit count up to the kernel's own (tcp_sock.total_retrans,
 * what RetransSegs and tcpi_total_retrans count): st->retrans_segs is how much of it
 * is already counted. The kernel can run a tracepoint without running our
 * programs and without counting a recursion miss (measured: every event raised
 * in a softirq that interrupted one particular task), so a retransmit event
 * counts what the kernel counted since the last one seen, and closes and
 * samples collect the rest. Returns the segments counted; those found after
 * `seen` more go to STAT_RETRANS_UNSEEN.
 */
static __always_inline __u32 sync_retrans(__u32 total, struct sock_state *st, __u32 seen,
					  struct flow_counters **cp)
{
	__u32 n = total - (__u32)st->retrans_segs;

	if ((__s32)n <= 0)
		return 0;
	st->retrans_segs += n;
	COUNT_INTO(cp, &st->key, retrans_segs, n);
	if (n > seen) {
		__u64 *v;
		__u32 idx = STAT_RETRANS_UNSEEN;

		v = bpf_map_lookup_elem(&stats, &idx);
		if (v)
			__sync_fetch_and_add(v, n - seen);
	}
	return n;
}

/*
 * Not a plain load: on 6.4+ the verifier checks every pointer loaded from a
 * field of a trusted pointer (a tp_btf argument) for a "__safe_trusted"/
 * "__safe_rcu" declaration, four linear searches of vmlinux BTF per check
 * (btf_nested_type_is_trusted), at every path through the load: most of the
 * start-up time before this. Through an untrusted view (the cast, a mov at
 * run time; else probe reads) it is checked like any other field.
 */
static __always_inline __u32 sk_netns(int direct, const struct sock *sk)
{
	if (direct == READ_CAST)
		return CAST(const struct sock, sk)->__sk_common.skc_net.net->ns.inum;
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

/* The peer as the contract names it: address, family and the service port. */
static __always_inline void peer_key(int direct, struct flow_key *k, const struct sock_common *skc,
				     __u8 role, __u16 local_port)
{
	__u16 family = RD(direct, skc, skc_family);

	__builtin_memset(k, 0, sizeof(*k));
	k->role = role;
	if (family == AF_INET) {
		__u32 daddr = RD(direct, skc, skc_daddr);

		k->addr[10] = 0xff;
		k->addr[11] = 0xff;
		__builtin_memcpy(&k->addr[12], &daddr, 4);
		k->family = FLOW_FAMILY_IPV4;
	} else {
		if (direct)
			__builtin_memcpy(&k->addr, skc->skc_v6_daddr.in6_u.u6_addr8, sizeof(k->addr));
		else
			BPF_CORE_READ_INTO(&k->addr, skc, skc_v6_daddr.in6_u.u6_addr8);
		k->family = FLOW_FAMILY_IPV6;
		/* An IPv4-mapped peer on an IPv6 socket is an IPv4 peer. */
		if (!(k->addr[0] | k->addr[1] | k->addr[2] | k->addr[3] | k->addr[4] |
		      k->addr[5] | k->addr[6] | k->addr[7] | k->addr[8] | k->addr[9]) &&
		    k->addr[10] == 0xff && k->addr[11] == 0xff)
			k->family = FLOW_FAMILY_IPV4;
	}
	if (role == FLOW_ROLE_CLIENT)
		k->port = bpf_ntohs(RD(direct, skc, skc_dport));
	else
		k->port = local_port;
}

static __always_inline struct sock_state *track_in(int direct, __u32 slot, const struct sock *sk,
						   const struct flow_key *key, __u16 flags, __u64 now)
{
	__u64 skp = (__u64)sk;
	struct sock_state *st;

	if (slot < (1 << OWNED_SLOTS_LOG2))	/* before the insert: see owned_filter */
		__sync_fetch_and_add(&owned_filter[slot], 1);
	if (bpf_map_update_elem(&socks, &skp, &zero_state, BPF_NOEXIST)) {
		if (slot < (1 << OWNED_SLOTS_LOG2))
			__sync_fetch_and_sub(&owned_filter[slot], 1);
		stat_inc(STAT_SOCKS_FULL);
		return NULL;
	}
	st = bpf_map_lookup_elem(&socks, &skp);
	if (!st)
		return NULL;
	st->key = *key;
	st->flags = flags;
	st->start_ns = now;
	st->peer_port = bpf_ntohs(RD(direct, sk, __sk_common.skc_dport));
	st->netns = sk_netns(direct, sk);
	st->conn_id = __sync_fetch_and_add(&next_conn_id, 1) + 1;
	return st;
}

static __always_inline struct sock_state *track(int direct, const struct sock *sk, const struct flow_key *key,
						__u16 flags, __u64 now)
{
	return track_in(direct, filter_slot(direct, sk), sk, key, flags, now);
}

static __always_inline void fill_event(struct flow_event *e, const struct sock_state *st, __u8 kind,
				       __u8 reason, __u64 now, __u64 duration_ns)
{
	e->key = st->key;
	e->kind = kind;
	e->reason = reason;
	e->peer_port = st->peer_port;
	e->srtt_us = st->srtt_us;
	e->tid = st->tid;
	e->ts_ns = now;
	e->duration_ns = duration_ns;
	e->conn_id = st->conn_id;
}

/* Never wake user space per record: it polls, and is woken once when a burst
 * fills `ring` past wakeup_bytes (not again for every record above it). */
static __always_inline __u64 wakeup_flag(void *ring)
{
	__u64 pending = bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA);

	return pending >= wakeup_bytes && pending < wakeup_bytes + sizeof(struct flow_event) ?
		       BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

/* A record of `st` into `ring`; a full ring counts it in stat `lost`. */
static __always_inline void ring_record(void *ring, __u32 lost, const struct sock_state *st, __u8 kind,
					__u8 reason, __u64 now, __u64 value)
{
	struct flow_event *e = bpf_ringbuf_reserve(ring, sizeof(*e), 0);

	if (!e) {
		stat_inc(lost);
		return;
	}
	fill_event(e, st, kind, reason, now, value);
	bpf_ringbuf_submit(e, wakeup_flag(ring));
}

static __always_inline void submit(const struct sock_state *st, __u8 kind, __u8 reason,
				   __u64 now, __u64 duration_ns)
{
	ring_record(&events, STAT_EVENTS_LOST, st, kind, reason, now, duration_ns);
}

static const struct hist_set zero_hists;
/* the keys a full hists map counts into, by role (user space inserts them) */
static const struct flow_key hist_overflow[4] = {
	[FLOW_ROLE_CLIENT] = { .family = FLOW_FAMILY_OVERFLOW, .role = FLOW_ROLE_CLIENT },
	[FLOW_ROLE_SERVER] = { .family = FLOW_FAMILY_OVERFLOW, .role = FLOW_ROLE_SERVER },
};

/*
 * A peer's entry in the hists map: created on first use; once the map is full,
 * the overflow key of the role (counted). NULL when there is none to be had
 * now (the update failed otherwise: -EBUSY, this CPU already inside an update
 * of the map in a program this one interrupted): the caller hands the value
 * over as a record instead, so nothing is lost or misattributed.
 */
static __always_inline struct hist_set *hist_set_of(const struct flow_key *fk, bool *folded)
{
	struct hist_set *set = bpf_map_lookup_elem(&hists, fk);
	long err;

	if (set)
		return set;
	err = bpf_map_update_elem(&hists, fk, &zero_hists, BPF_NOEXIST);
	set = bpf_map_lookup_elem(&hists, fk);	/* also one another CPU just made */
	if (set || (err != -E2BIG && err != -ENOMEM))
		return set;
	stat_inc(STAT_HISTS_FOLDED);
	*folded = true;
	return bpf_map_lookup_elem(&hists, &hist_overflow[fk->role & 3]);
}

/*
 * One histogram point into a peer's entry: what user space would have done with
 * the record's value (bucket by the SDK's rule, sum, min, max), without the
 * record. Counts and sum are atomic adds (the nested copy of a program may
 * interrupt it on the same CPU; another CPU may add to the same peer); the
 * extremes are plain compare-and-store, so two new extremes of one peer within
 * the same few nanoseconds can keep the less extreme one. Inlined in hist_put().
 */
static __always_inline void hist_add(struct hist_set *set, __u32 hist, __u64 value)
{
	struct hist_extremes *ext;
	struct hist_bounds *b;
	struct hist_value *v;
	__u64 i, tag;

	/* constant offsets: the verifier loses a bound on the argument */
	if (hist == HIST_HANDSHAKE) {
		v = &set->hist[HIST_HANDSHAKE];
		b = &hist_bounds[HIST_HANDSHAKE];
	} else if (hist == HIST_DURATION) {
		v = &set->hist[HIST_DURATION];
		b = &hist_bounds[HIST_DURATION];
	} else {
		v = &set->hist[HIST_RTT];
		b = &hist_bounds[HIST_RTT];
	}
	/* The bucket: how many bounds lie below the value (the SDK's bisect_left), by a
	 * binary search over the 31 bounds, which are in order (user space aggregates here
	 * only bounds in order; unused ones are 2^63 - 1, above every value): five loads
	 * instead of 31. Without a branch (bounds and values are below 2^63, so the
	 * difference's top bit says "below"): nothing for the verifier to explore at each of
	 * the programs that inline a caller. */
	i = 0;
#define HIST_STEP(k) (i += ((b->bound[i + (k) - 1] - value) >> 63) * (k))
	HIST_STEP(16);
	HIST_STEP(8);
	HIST_STEP(4);
	HIST_STEP(2);
	HIST_STEP(1);
#undef HIST_STEP
	__sync_fetch_and_add(&v->sum, value);
	__sync_fetch_and_add(&v->buckets[i & (HIST_BUCKETS - 1)], 1);
	tag = (__u64)hist_gen + 1;	/* never the 0 of a new entry */
	ext = &v->ext[tag & 1];
	if (ext->gen != tag) {
		ext->min = value;
		ext->max = value;
		ext->gen = tag;
		return;
	}
	if (value < ext->min)
		ext->min = value;
	if (value > ext->max)
		ext->max = value;
}

/*
 * A handshake's (which: HIST_MODE_HANDSHAKE; a: its ns) or a close's (HIST_MODE_CLOSE; a:
 * the duration in ns, b: the RTT in us or 0) histogram values into the peer's entry. A
 * global function taking the key as numbers: verified once per program, not again at
 * each place that inlines one of its callers (that made the load ~15 ms longer).
 * HIST_PUT_NONE: not aggregated (no entry to be had): the caller hands the values over
 * as a record; HIST_PUT_FOLDED: aggregated into the overflow key of the role (the map
 * is full), not the peer's.
 */
__noinline int hist_put(__u64 addr_lo, __u64 addr_hi, __u64 meta, __u64 a, __u64 b)
{
	struct hist_set *set;
	struct flow_key k;
	bool folded = false;

	__builtin_memcpy(&k.addr[0], &addr_lo, 8);
	__builtin_memcpy(&k.addr[8], &addr_hi, 8);
	k.port = meta;
	k.family = meta >> 16;
	k.role = meta >> 24;
	set = hist_set_of(&k, &folded);
	if (!set)
		return HIST_PUT_NONE;
	if ((meta >> 32) == HIST_MODE_HANDSHAKE) {
		hist_add(set, HIST_HANDSHAKE, a);
	} else {
		hist_add(set, HIST_DURATION, a);
		if (b)
			hist_add(set, HIST_RTT, b);
	}
	return folded ? HIST_PUT_FOLDED : HIST_PUT_PEER;
}

/* hist_put() for a tracked socket's key. */
static __always_inline int hist_put_of(const struct sock_state *st, __u32 which, __u64 a, __u64 b)
{
	__u64 lo, hi;

	__builtin_memcpy(&lo, &st->key.addr[0], 8);
	__builtin_memcpy(&hi, &st->key.addr[8], 8);
	return hist_put(lo, hi, st->key.port | (__u64)st->key.family << 16 | (__u64)st->key.role << 24 |
			(__u64)which << 32, a, b);
}

static __always_inline void conn_record(const struct sock_state *st, __u8 kind, __u8 reason,
					__u64 now, __u64 value)
{
	ring_record(&conn_events, STAT_CONN_EVENTS_LOST, st, kind, reason, now, value);
}

static __always_inline bool spans_open(void)
{
	return !*(volatile __u32 *)&spans_idle;
}

/* The CONN record held back while no span was open (its conn_reason + 1), taken
 * by one caller only, 0 if none: the send and receive programs run outside the
 * socket lock, hence the compare-and-swap. */
static __always_inline __u32 take_conn_later(struct sock_state *st)
{
	__u32 later = st->conn_later;

	return later && __sync_val_compare_and_swap(&st->conn_later, later, 0) == later ? later : 0;
}

/* That CONN record sent as it would have been (its reason, ESTABLISHED time and handshake). */
static __always_inline void conn_catch_up(struct sock_state *st)
{
	__u32 later = take_conn_later(st);

	if (later)
		conn_record(st, FLOW_EVENT_CONN, later - 1, st->established_ns, st->handshake_ns);
}

/* A span-enrichment record: read when a span ends and on every poll, woken for
 * only past wakeup_bytes (churn with no span ending would fill the ring between
 * polls); none until user space has spans to enrich (CONTROL_SPANS), and none
 * while no span is open (spans_idle): a CONN record then waits for the
 * connection's first use or event with a span open, the others are not made
 * (no span can have been open for them), a GONE whose CONN was never sent
 * neither. */
static __always_inline void conn_event(struct sock_state *st, __u8 kind, __u8 reason,
				       __u64 now, __u64 value)
{
	if (!span_mode || (st->flags & SF_PENDING))	/* pending: maybe another process's */
		return;
	if (!control_on(CONTROL_SPANS))
		return;
	if (kind == FLOW_EVENT_GONE) {
		if (take_conn_later(st))
			return;	/* user space never heard of it */
	} else if (!spans_open()) {
		if (kind == FLOW_EVENT_CONN)
			st->conn_later = reason + 1;
		return;
	} else if (kind != FLOW_EVENT_CONN) {
		conn_catch_up(st);
	}
	conn_record(st, kind, reason, now, value);
}

static __always_inline __u32 read_srtt_us(int direct, const struct tcp_sock *tp)
{
	return RD(direct, tp, srtt_us) >> 3;
}

/* A value the verifier does not know (one probe read of a copy): a
 * pointer's value as a number, which a global function may take (it refuses
 * a pointer for a scalar argument), or a constant it need not follow. */
static __always_inline __u64 opaque(__u64 x)
{
	__u64 v = 0;

	bpf_probe_read_kernel(&v, sizeof(v), &x);
	return v;
}

struct slot_scan {
	struct thread_conns *tc;
	__u64 conn_id;
	__u64 oldest;
	__u32 victim;
	__u32 __pad0;
};

static long slot_scan_step(__u32 i, void *data)
{
	struct slot_scan *s = data;
	struct thread_conns *tc = s->tc;

	if (i >= THREAD_SLOTS)
		return 1;
	if (tc->slot[i].conn_id == s->conn_id) {
		s->victim = i;
		return 1;
	}
	if (tc->slot[i].last_ns < s->oldest) {
		s->oldest = tc->slot[i].last_ns;
		s->victim = i;
	}
	return 0;
}

/*
 * Remember that thread `tid` used connection `conn_id` now (span
 * enrichment); returns the slot it is in now, THREAD_SLOTS if unchanged
 * (`hint`: where it was last time). Global functions: the verifier checks
 * the scan once per program, not once per path that reaches it; with
 * bpf_loop (5.17+: the programs that load only on 6.2+) one step of it.
 */
static __always_inline __u32 use_slot(__u32 tid, __u64 conn_id, __u32 srtt_us, __u32 hint, __u64 now,
				      bool use_bpf_loop)
{
	struct thread_conns *tc;
	__u64 oldest = ~0ULL;
	__u32 i, victim = 0;

	tc = bpf_map_lookup_elem(&threads, &tid);
	if (!tc) {
		bpf_map_update_elem(&threads, &tid, &zero_thread, BPF_NOEXIST);
		tc = bpf_map_lookup_elem(&threads, &tid);
		if (!tc)
			return THREAD_SLOTS;
	}
	/* The usual case, a thread using the same connection again: its slot
	 * from last time, without the scan (conn_ids are unique). */
	if (hint < THREAD_SLOTS && tc->slot[hint].conn_id == conn_id) {
		tc->slot[hint].last_ns = now;
		tc->slot[hint].srtt_us = srtt_us;
		return THREAD_SLOTS;
	}
	if (use_bpf_loop) {
		struct slot_scan scan = { .tc = tc, .conn_id = conn_id, .oldest = oldest };

		bpf_loop(THREAD_SLOTS, slot_scan_step, &scan, 0);
		victim = scan.victim;
	} else {
		for (i = 0; i < THREAD_SLOTS; i++) {
			if (tc->slot[i].conn_id == conn_id) {
				victim = i;
				break;
			}
			if (tc->slot[i].last_ns < oldest) {
				oldest = tc->slot[i].last_ns;
				victim = i;
			}
		}
		/* Past the verifier's eyes: else each slot the scan can pick is
		 * a different constant index, and the scan is verified once per pick. */
		victim = (__u32)opaque(victim);
	}
	if (victim >= THREAD_SLOTS)
		return THREAD_SLOTS;
	tc->slot[victim].conn_id = conn_id;
	tc->slot[victim].last_ns = now;
	tc->slot[victim].srtt_us = srtt_us;
	return victim;
}

__noinline __u32 note_use_slot(__u32 tid, __u64 conn_id, __u32 srtt_us, __u32 hint, __u64 now)
{
	return use_slot(tid, conn_id, srtt_us, hint, now, false);
}

__noinline __u32 note_use_slot_loop(__u32 tid, __u64 conn_id, __u32 srtt_us, __u32 hint, __u64 now)
{
	return use_slot(tid, conn_id, srtt_us, hint, now, true);
}

/* `loop`: the program loads only where bpf_loop exists (READ_CAST: 6.2+;
 * the send/receive tracepoints: 6.3+). */
static __always_inline void note_use(bool loop, __u32 tid, struct sock_state *st, __u64 now)
{
	__u32 slot;

	if (!span_mode || !spans_open())
		return;
	conn_catch_up(st);
	slot = loop ? note_use_slot_loop(tid, st->conn_id, st->srtt_us, st->slot, now) :
		      note_use_slot(tid, st->conn_id, st->srtt_us, st->slot, now);
	if (slot < THREAD_SLOTS)
		st->slot = slot;
}

/*
 * Count payload bytes since the last report. The kernel's bytes_acked and
 * bytes_received also count the SYN and FIN sequence numbers: the SYN is left
 * out by the baseline taken at ESTABLISHED, a FIN is taken off here once it
 * has been acknowledged (ours: SF_FIN_SENT, set at FIN_WAIT1 or LAST_ACK, and
 * also from the state the socket is in or closes from, so that a transition no
 * program ran for does not count the FIN as a byte) or received (theirs:
 * SOCK_DONE).
 */
static __always_inline void account_bytes(int direct, struct sock_state *st, const struct tcp_sock *tp,
					  struct flow_counters **cp)
{
	__u64 acked = RD(direct, tp, bytes_acked);
	__u64 received = RD(direct, tp, bytes_received);
	unsigned long sk_flags = RD(direct, &tp->inet_conn.icsk_inet.sk, __sk_common.skc_flags);

	if ((st->flags & SF_FIN_SENT) && acked &&
	    RD(direct, tp, snd_una) == RD(direct, tp, write_seq))
		acked--;
	if (received && (sk_flags & (1UL << bpf_core_enum_value(enum sock_flags, SOCK_DONE))))
		received--;

	if (acked > st->bytes_acked) {
		COUNT_INTO(cp, &st->key, bytes_acked, acked - st->bytes_acked);
		st->bytes_acked = acked;
	}
	if (received > st->bytes_received) {
		COUNT_INTO(cp, &st->key, bytes_received, received - st->bytes_received);
		st->bytes_received = received;
	}
}

/* What ESTABLISHED counts; deferred to the claim for a pending socket. Returns the
 * reason of the socket's CONN span record: CONN_HIST_IN_KERNEL when its handshake
 * point went into the hists map (user space takes the point's exemplar from that
 * record: no handshake record), else CONN_ESTABLISHED. */
static __always_inline __u8 count_established(struct sock_state *st, struct flow_counters **cp)
{
	COUNT_INTO(cp, &st->key, attempts_ok, 1);
	if (st->flags & SF_NO_WSCALE)
		COUNT_INTO(cp, &st->key, wscale_disabled, 1);
	if (st->handshake_ns) {
		__u32 mode = hist_mode;
		int put = (mode & HIST_MODE_HANDSHAKE) ?
			  hist_put_of(st, HIST_MODE_HANDSHAKE, st->handshake_ns, 0) : HIST_PUT_NONE;

		if (put == HIST_PUT_NONE || (mode & HIST_MODE_AUDIT))
			submit(st, FLOW_EVENT_HANDSHAKE, 0, st->established_ns, st->handshake_ns);
		/* folded into the overflow key: an exemplar would name a series without the point */
		return put == HIST_PUT_PEER ? CONN_HIST_IN_KERNEL : CONN_ESTABLISHED;
	}
	if (st->key.role == FLOW_ROLE_SERVER && !(st->flags & SF_UNSEEN))
		stat_inc(STAT_SYN_WAIT_MISSED);
	return CONN_ESTABLISHED;
}

/* A state a connection reaches only once established (TIME_WAIT sockets are
 * not full sockets: the iterator never shows them). */
static __always_inline bool established_state(int state)
{
	return state == TCP_ESTABLISHED || state == TCP_FIN_WAIT1 || state == TCP_FIN_WAIT2 ||
	       state == TCP_CLOSE_WAIT || state == TCP_CLOSING || state == TCP_LAST_ACK;
}

/* A full socket in this state has queued its FIN (tcp_send_fin() follows the
 * transition under the same socket lock, before anything else can see it). */
static __always_inline bool fin_queued_state(int state)
{
	return state == TCP_FIN_WAIT1 || state == TCP_FIN_WAIT2 || state == TCP_CLOSING || state == TCP_LAST_ACK;
}

/* Which socket a pointer names: its peer port and address (an IPv6 one folded
 * to 32 bits), set before SYN_RECV and kept after CLOSE (a later socket at the
 * same address is another connection). */
static __always_inline __u64 sock_identity(int direct, const struct sock *sk)
{
	__u32 addr = RD(direct, sk, __sk_common.skc_daddr);

	if (RD(direct, sk, __sk_common.skc_family) == AF_INET6)
		addr = RD(direct, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr32[0]) ^
		       RD(direct, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr32[1]) ^
		       RD(direct, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr32[2]) ^
		       RD(direct, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr32[3]);
	return ((__u64)RD(direct, sk, __sk_common.skc_dport) << 32) | addr;
}

/* An untracked socket on our listener that is not to be taken on: established
 * before load (see the preexisting map) or not tracked for want of room. */
static __always_inline bool marked(void *map, int direct, const struct sock *sk)
{
	__u64 skp = (__u64)sk;
	__u64 *id = bpf_map_lookup_elem(map, &skp);

	return id && *id == sock_identity(direct, sk);
}

static __always_inline bool preexisting_sock(int direct, const struct sock *sk)
{
	return marked(&preexisting, direct, sk) || marked(&evicted, direct, sk);
}

static __always_inline void synack_key_of(struct synack_key *k, const struct flow_key *key, __u16 peer_port,
					  __u32 netns)
{
	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->addr, key->addr, sizeof(k->addr));
	k->peer_port = peer_port;
	k->local_port = key->port;
	k->netns = netns;
}

/* A SYN-ACK retransmit counted on the listener: remembered for its request. */
static __always_inline void note_synack(const struct flow_key *key, __u16 peer_port, __u32 netns)
{
	struct synack_count one = { .segs = 1 };
	struct synack_count *v;
	struct synack_key k;
	__u64 now = bpf_ktime_get_ns();

	synack_key_of(&k, key, peer_port, netns);
	v = bpf_map_lookup_elem(&synacks, &k);
	if (!v) {
		one.last_ns = now;
		if (!bpf_map_update_elem(&synacks, &k, &one, BPF_NOEXIST))
			return;
		v = bpf_map_lookup_elem(&synacks, &k);	/* inserted meanwhile on another CPU */
		if (!v) {
			synacks_full_ns = now;
			stat_inc(STAT_SYNACKS_FULL);
			return;
		}
	}
	__sync_fetch_and_add(&v->segs, 1);
	v->last_ns = now;
}

/*
 * Of `total` (the new socket's total_retrans, which starts at its request's
 * SYN-ACK retransmits: tcp_create_openreq_child), how many were counted on the
 * listener; the rest no program ran for. Forgets the request.
 */
static __always_inline __u32 synacks_counted(__u32 total, const struct sock_state *st, __u64 now)
{
	struct synack_count *v;
	struct synack_key k;
	__u32 counted;

	if (!total)
		return 0;
	synack_key_of(&k, &st->key, st->peer_port, st->netns);
	v = bpf_map_lookup_elem(&synacks, &k);
	if (!v) {
		/* none counted, unless one could not be kept lately */
		if (synacks_full_ns && now - synacks_full_ns < SYNACK_LIFE_NS)
			return total;
		return 0;
	}
	counted = v->segs;
	bpf_map_delete_elem(&synacks, &k);
	return counted < total ? counted : total;
}


/* queued_synack_us*(): the request was on the queue (its snt_synack may be 0: a SYN cookie's) */
#define SYNACK_FOUND (1ULL << 63)

struct queue_walk {
	__u64 req;	/* the request to look at next */
	__u64 sk;
	__u64 found;
};

static long queue_walk_step(__u32 i, void *data)
{
	struct queue_walk *w = data;
	struct request_sock *req = (struct request_sock *)w->req;

	if (!req)
		return 1;
	if ((__u64)BPF_CORE_READ(req, sk) == w->sk) {
		w->found = w->req;
		return 1;
	}
	w->req = (__u64)BPF_CORE_READ(req, dl_next);
	return 0;
}

/*
 * When the first SYN-ACK left (tcp_request_sock.snt_synack, us) for the
 * request that made socket `sk`, found on listener `lsk`'s accept queue: its
 * tail, else from its head (at most ACCEPT_QUEUE_WALK requests). Probe reads
 * (a stored pointer, untyped to the verifier). Global functions: the verifier
 * checks the walk once, with the arguments unknown, not once per path that
 * reaches it; with bpf_loop (5.17+: the READ_CAST programs, 6.2+) it checks
 * one step, not each of the 64.
 */
static __always_inline __u64 queued_synack(__u64 lsk, __u64 sk, bool use_bpf_loop)
{
	const struct inet_connection_sock *icsk = (const void *)lsk;
	struct request_sock *req;
	int i;

	req = BPF_CORE_READ(icsk, icsk_accept_queue.rskq_accept_tail);
	if (req && (__u64)BPF_CORE_READ(req, sk) != sk) {
		req = BPF_CORE_READ(icsk, icsk_accept_queue.rskq_accept_head);
		if (use_bpf_loop) {
			struct queue_walk w = { .req = (__u64)req, .sk = sk };

			bpf_loop(ACCEPT_QUEUE_WALK, queue_walk_step, &w, 0);
			req = (struct request_sock *)w.found;
		} else {
			for (i = 0; i < ACCEPT_QUEUE_WALK && req; i++) {
				if ((__u64)BPF_CORE_READ(req, sk) == sk)
					break;
				req = BPF_CORE_READ(req, dl_next);
			}
			if (i == ACCEPT_QUEUE_WALK)
				req = NULL;
		}
	}
	if (!req)
		return 0;
	return BPF_CORE_READ((struct tcp_request_sock *)req, snt_synack) | SYNACK_FOUND;
}

__noinline __u64 queued_synack_us(__u64 lsk, __u64 sk)
{
	return queued_synack(lsk, sk, false);
}

__noinline __u64 queued_synack_us_loop(__u64 lsk, __u64 sk)
{
	return queued_synack(lsk, sk, true);
}

/* A server socket's first smoothed RTT (tcp_sock.srtt_us, us << 3) as the SYN wait it
 * measured, in ns: 0 (none) stays 0; a wait under 1 us counts as 1 ns, not as none. */
static __always_inline __u64 synack_rtt_ns(__u32 srtt)
{
	__u64 ns = (__u64)(srtt >> 3) * 1000;

	return srtt && !ns ? 1 : ns;
}

static __always_inline void on_established(int direct, const struct sock *sk,
					   const struct tcp_sock *tp, struct sock_state *st, __u64 now)
{
	const struct tcp_options_received *opt = __builtin_preserve_access_index(&tp->rx_opt);
	__u64 handshake_ns = 0;

	st->flags |= SF_ESTABLISHED;
	st->established_ns = now;
	st->srtt_us = read_srtt_us(direct, tp);
	st->bytes_acked = RD(direct, tp, bytes_acked);	/* the SYN */
	st->bytes_received = RD(direct, tp, bytes_received);
	if (!RD_BITFIELD(direct, opt, wscale_ok))
		st->flags |= SF_NO_WSCALE;

	if (st->key.role == FLOW_ROLE_CLIENT) {
		handshake_ns = now - st->start_ns;
	} else {
		/* SYN wait: the request that made this socket was just queued on the
		 * listener's accept queue, as its tail unless a handshake completing
		 * on another CPU queued one behind it: then it is found from the head.
		 * Its first SYN-ACK left when the SYN came. */
		struct listener_key lk = { .netns = st->netns, .port = st->key.port };
		__u64 *lsk = find_listener(&lk);
		struct inet_connection_sock *icsk;
		struct request_sock *req = NULL;
		__u64 snt_synack_us = 0;
		bool walk = lsk != NULL;

		if (lsk && direct == READ_CAST) {
			icsk = CAST(struct inet_connection_sock, (void *)*lsk);
			req = icsk->icsk_accept_queue.rskq_accept_tail;
			if (req && req->sk == sk) {
				snt_synack_us = CAST(struct tcp_request_sock, req)->snt_synack | SYNACK_FOUND;
				walk = false;
			}
			req = NULL;
		}
		if (walk && lsk)
			snt_synack_us = direct == READ_CAST ? queued_synack_us_loop(*lsk, opaque((__u64)sk)) :
							      queued_synack_us(*lsk, opaque((__u64)sk));
		if (snt_synack_us & SYNACK_FOUND) {
			snt_synack_us &= ~SYNACK_FOUND;	/* 0: a SYN cookie's request, no time */
			if (snt_synack_us && now / 1000 >= snt_synack_us)
				handshake_ns = now - snt_synack_us * 1000;
		} else if (lsk && !RD(direct, tp, total_retrans) && !RD(direct, tp, data_segs_out)) {
			/* Not on the queue: an accept() on another CPU took it in the moment
			 * between the kernel queueing it and this state change (a server
			 * accepting in a loop). The same interval, in us, is the kernel's
			 * first RTT sample of the socket, taken from that request when its
			 * SYN-ACK was not retransmitted (tcp_synack_rtt_meas); 0 if none.
			 * Not if the socket sent data before (a Fast Open child): its
			 * first sample may be that data's. */
			handshake_ns = synack_rtt_ns(RD(direct, tp, srtt_us));
		}
	}
	st->handshake_ns = handshake_ns;
	/* an accepted socket: the SYN-ACK retransmits its request left in
	 * total_retrans were counted on the listener, but those no program ran
	 * for (or, pending, all of them at the claim) */
	if (st->key.role == FLOW_ROLE_SERVER) {
		__u32 total = RD(direct, tp, total_retrans);

		if (st->flags & SF_PENDING)
			st->retrans_segs = total;
		else
			st->retrans_segs += synacks_counted(total, st, now);
	}
	if (!(st->flags & SF_PENDING)) {
		struct flow_counters *c = NULL;
		__u8 reason;

		reason = count_established(st, &c);
		conn_event(st, FLOW_EVENT_CONN, reason, now, handshake_ns);
		if (st->key.role == FLOW_ROLE_SERVER)
			sync_retrans(RD(direct, tp, total_retrans), st, 0, &c);
	}
}

/*
 * A connection found established though no program ran for its ESTABLISHED
 * (nor, for an untracked server socket, its SYN_RECV: the kernel can run a
 * tracepoint without our programs, see sync_retrans): counted now as a
 * completed handshake of unknown duration (no handshake or connection-duration
 * point) and in STAT_HANDSHAKE_UNSEEN. Its bytes count from the start: what
 * the kernel had counted by ESTABLISHED is a client's SYN, acknowledged.
 * `state`: its state now (or before CLOSE), -1 if unknown.
 */
static __always_inline void late_established(int direct, const struct tcp_sock *tp, struct sock_state *st,
					     __u64 now, int state)
{
	const struct tcp_options_received *opt = __builtin_preserve_access_index(&tp->rx_opt);
	struct flow_counters *c = NULL;

	st->flags |= SF_ESTABLISHED | SF_UNSEEN;
	if (state == TCP_FIN_WAIT1 || state == TCP_FIN_WAIT2 || state == TCP_CLOSING || state == TCP_LAST_ACK)
		st->flags |= SF_FIN_SENT;
	st->established_ns = now;
	st->srtt_us = read_srtt_us(direct, tp);
	st->bytes_acked = st->key.role == FLOW_ROLE_CLIENT ? 1 : 0;
	st->bytes_received = 0;
	if (!RD_BITFIELD(direct, opt, wscale_ok))
		st->flags |= SF_NO_WSCALE;
	if (st->flags & SF_PENDING)
		return;	/* counted at the claim, if this process claims it */
	stat_inc(STAT_HANDSHAKE_UNSEEN);
	if (st->key.role == FLOW_ROLE_SERVER)
		st->retrans_segs += synacks_counted(RD(direct, tp, total_retrans), st, now);
	count_established(st, &c);
	conn_event(st, FLOW_EVENT_CONN, CONN_ESTABLISHED, now, 0);
}

/*
 * late_established() as a global function, which the verifier checks once
 * rather than in every program and path that may find such a connection (see
 * attempt_error()): the socket passed as a number (see SOCK_VIEW), its state
 * looked up again. Rare: once per connection at most.
 */
#define LATE_ESTABLISHED_AT(suffix, mode)                                              \
__noinline int late_established_at##suffix(__u64 skp, __u64 now, int state)            \
{                                                                                      \
	struct sock_state *st = bpf_map_lookup_elem(&socks, &skp);                     \
	const struct tcp_sock *tp = tcp_of(mode, SOCK_VIEW(mode, skp));                 \
                                                                                       \
	if (st && tp)                                                                  \
		late_established(mode, tp, st, now, state);                            \
	return 0;                                                                      \
}
LATE_ESTABLISHED_AT(, READ_PROBE)
LATE_ESTABLISHED_AT(_cast, READ_CAST)

/*
 * attempt_error() and final_close_reason() are global functions, not inlined: the
 * verifier checks each once and sees its result as any value, where an inlined
 * copy hands each constant it can return to the rest of the close path (an
 * array index, so never pruned), which was then verified once per reason.
 */
__noinline __u32 attempt_error(int err, __u32 retrans_segs)
{
	switch (err) {
	case ECONNREFUSED:
		return CONN_ERR_REFUSED;
	case ETIMEDOUT:
		return CONN_ERR_TIMED_OUT;
	case ECONNRESET:
		return CONN_ERR_RESET;
	case EHOSTUNREACH:
		return CONN_ERR_HOST_UNREACHABLE;
	case ENETUNREACH:
		return CONN_ERR_NET_UNREACHABLE;
	case 0:
		/* The application gave up (its own connect timeout): a time-out if
		 * the kernel had already retransmitted the SYN unanswered. */
		return retrans_segs ? CONN_ERR_TIMED_OUT : CONN_ERR_OTHER;
	default:
		return CONN_ERR_OTHER;
	}
}

static __always_inline __u8 close_reason(int err, __u16 flags)
{
	if (flags & SF_RST_RECEIVED)
		return CLOSE_RESET_RECEIVED;
	if (flags & SF_RST_SENT)
		return CLOSE_RESET_SENT;
	if (err == ETIMEDOUT)
		return CLOSE_TIMEOUT;
	if (err)
		return CLOSE_OTHER;
	return CLOSE_NORMAL;
}

__noinline __u32 final_close_reason(int err, __u32 flags)
{
	return close_reason(err, flags);
}

static __always_inline void finalize_close(struct sock_state *st, struct flow_counters **cp)
{
	__u8 reason = final_close_reason(st->err, st->flags);
	__u32 mode;

	st->flags |= SF_FINAL;
	COUNT_INTO(cp, &st->key, closes[reason & 7], 1);
	mode = hist_mode;
	/* a connection found established late keeps its record (its RTT's exemplar) */
	if ((mode & HIST_MODE_CLOSE) && !(st->flags & SF_UNSEEN) &&
	    hist_put_of(st, HIST_MODE_CLOSE, st->closed_ns - st->established_ns, st->srtt_us) != HIST_PUT_NONE &&
	    !(mode & HIST_MODE_AUDIT))
		return;
	/* a connection found established late: its RTT, but no duration */
	submit(st, (st->flags & SF_UNSEEN) ? FLOW_EVENT_RTT : FLOW_EVENT_CLOSE, reason, st->closed_ns,
	       st->closed_ns - st->established_ns);
}

/* The entry's last act, whoever forgets it: its zero-window marks and its
 * owned_filter count go with it. */
static __always_inline void drop_entry(__u32 slot, __u64 skp, struct sock_state *st)
{
	if (st->flags & SF_PEER_ZERO_WIN)
		__sync_fetch_and_sub(&zero_win_marks, 1);
	if (st->flags & SF_OUR_ZERO_WIN)
		__sync_fetch_and_sub(&zero_win_marks, 1);
	st->flags &= ~(SF_PEER_ZERO_WIN | SF_OUR_ZERO_WIN);
	/* after the delete: see owned_filter */
	if (!bpf_map_delete_elem(&socks, &skp) && slot < (1 << OWNED_SLOTS_LOG2))
		__sync_fetch_and_sub(&owned_filter[slot], 1);
}

static __always_inline void forget_in(__u32 slot, const struct sock *sk, struct sock_state *st)
{
	if (st->flags & SF_LISTENER) {
		struct listener_key lk = { .netns = st->netns, .port = st->key.port };

		remove_listener(&lk);
	} else {
		conn_event(st, FLOW_EVENT_GONE, 0, bpf_ktime_get_ns(), 0);
	}
	drop_entry(slot, (__u64)sk, st);
}

static __always_inline void forget(int direct, const struct sock *sk, struct sock_state *st)
{
	forget_in(filter_slot(direct, sk), sk, st);
}

/*
 * A listener's overflows: the growth of its sk_drops, less the drops charged
 * to it that were no overflow. sk_drops grows by one for a SYN dropped because
 * the accept queue is full (and for a SYN refused for a full SYN queue), by two
 * for a request whose final ACK finds the accept queue full, and by one for
 * every segment the kernel discards on the listener's behalf: a repeated SYN or
 * ACK of a request it holds, an RST or a flagless segment sent to it, a failed
 * socket filter, IPsec policy or signature check. Each of the latter frees its
 * segment with skb:kfree_skb naming the listener (rx_sk), as does the final ACK
 * that overflows; the kfree_skb program below takes those off (st->drops is
 * what is already accounted for, so they never show as overflows). Without it
 * (kernels before 6.11) every growth counts. `drops` is updated with a
 * compare-and-swap: the kfree_skb program may add to it on another CPU.
 */
static __always_inline void listener_drops(int direct, const struct sock *sk, struct sock_state *st)
{
	__u32 drops = RD(direct, sk, sk_drops.counter);
	__u32 seen = st->drops;

	if (st->flags & SF_PENDING)
		return;	/* a listener inherited at fork: its creator counts its drops */
	if ((__s32)(drops - seen) > 0 && __sync_val_compare_and_swap(&st->drops, seen, drops) == seen)
		COUNT(&st->key, listen_overflows, drops - seen);
}

static __always_inline void count_closed(int direct, const struct tcp_sock *tp, struct sock_state *st,
					 struct flow_counters **cp)
{
	account_bytes(direct, st, tp, cp);
	sync_retrans(RD(direct, tp, total_retrans), st, 0, cp);
	COUNT_INTO(cp, &st->key, closed, 1);
	/* A reason already certain is final now; an apparently normal close may
	 * still be followed by our RST (unread data, SO_LINGER 0), so it is
	 * settled when the socket is destroyed. */
	if (close_reason(st->err, st->flags) != CLOSE_NORMAL)
		finalize_close(st, cp);
}

/* The socket reached CLOSE from `oldstate` (or, if that transition was skipped, is destroyed:
 * -1); true if it is forgotten. */
static __always_inline bool on_close(int direct, __u32 slot, const struct sock *sk, struct sock_state *st,
				     struct flow_counters **cp, int oldstate)
{
	const struct tcp_sock *tp = tcp_of(direct, sk);
	unsigned long sk_flags;

	if (!tp)
		return false;
	st->flags |= SF_CLOSED;
	/* our FIN, even if no program ran for the transition that sent it */
	if (oldstate >= 0 && fin_queued_state(oldstate))
		st->flags |= SF_FIN_SENT;
	st->closed_ns = bpf_ktime_get_ns();
	st->srtt_us = read_srtt_us(direct, tp);
	st->err = RD(direct, sk, sk_err);

	/* Established, though no program saw it: the state it leaves, else (destroyed)
	 * the kernel's count of our SYN acknowledged (client) or an RTT measured (server) */
	if (!(st->flags & SF_ESTABLISHED) &&
	    (oldstate >= 0 ? established_state(oldstate) :
	     st->key.role == FLOW_ROLE_CLIENT ? RD(direct, tp, bytes_acked) != 0 : st->srtt_us != 0))
		CALL_AT(direct, late_established_at, opaque((__u64)sk), st->closed_ns, oldstate);
	if (!(st->flags & SF_ESTABLISHED)) {
		/* A client attempt that never completed; an embryonic server
		 * socket is simply forgotten. */
		if (st->key.role == FLOW_ROLE_CLIENT) {
			sync_retrans(RD(direct, tp, total_retrans), st, 0, cp);	/* SYNs */
			COUNT_INTO(cp, &st->key, attempts_failed[attempt_error(st->err, st->retrans_segs) & 7], 1);
		} else if (!(st->flags & SF_PENDING)) {
			stat_inc(STAT_CHILD_DISCARDED);
		}
		forget_in(slot, sk, st);
		return true;
	}
	if (st->flags & SF_PENDING)
		return false;	/* counted if this process claims it before it is destroyed */
	count_closed(direct, tp, st, cp);
	/* Already closed by the application (orphaned): nothing can follow but its
	 * destruction, so the reason is final now and the socket is forgotten here,
	 * not left to the destroy hook alone. */
	sk_flags = RD(direct, sk, __sk_common.skc_flags);
	if (sk_flags & (1UL << bpf_core_enum_value(enum sock_flags, SOCK_DEAD))) {
		if (!(st->flags & SF_FINAL))
			finalize_close(st, cp);
		forget_in(slot, sk, st);
		return true;
	}
	return false;
}

/* Whether a socket's local port is one of our listeners' (the listen filter: no
 * false negative, few false positives): an accepted socket may be ours. Read
 * from inet_sport, which a socket keeps after CLOSE (skc_num is 0 then). */
static __always_inline bool on_our_listen_port(int direct, const struct sock *sk)
{
	const struct tcp_sock *tp = tcp_of(direct, sk);

	return tp && listen_filter[listen_slot(bpf_ntohs(RD(direct, tp, inet_conn.icsk_inet.inet_sport)))];
}

/*
 * on_close() as a global function: once per connection, checked once per
 * program rather than on each path to it. Returns 1 if the socket was forgotten.
 *
 * closed_unseen_at(): CLOSE of an established socket we do not track: one
 * accepted on our listener whose handshake no program saw, unless it predates
 * the probes. Not in claim mode: whose it is, only a claim says. Returns 1 if it
 * took the socket on: the caller then closes it with on_close_at() (called from
 * here, the two frames would stack up past the verifier's 512 bytes with
 * anything more below on_close_at()).
 */
#define CLOSE_AT(suffix, mode)                                                          \
__noinline int on_close_at##suffix(__u64 skp, int oldstate, __u32 slot)                 \
{                                                                                       \
	struct sock_state *st = bpf_map_lookup_elem(&socks, &skp);                      \
	struct flow_counters *c = NULL;                                                 \
                                                                                        \
	if (!st)                                                                        \
		return 1;                                                               \
	return on_close(mode, slot, SOCK_VIEW(mode, skp), st, &c, oldstate);            \
}                                                                                       \
                                                                                        \
__noinline int closed_unseen_at##suffix(__u64 skp, __u32 slot)                          \
{                                                                                       \
	const struct sock *sk = SOCK_VIEW(mode, skp);                                   \
	struct listener_key lk = {};                                                    \
	const struct tcp_sock *tp;                                                      \
	struct flow_key key;                                                            \
                                                                                        \
	tp = tcp_of(mode, sk);                                                          \
	if (!tp)                                                                        \
		return 0;                                                               \
	/* skc_num is 0 now; the caller asked the listen filter (on_our_listen_port) */ \
	lk.port = bpf_ntohs(RD(mode, tp, inet_conn.icsk_inet.inet_sport));              \
	lk.netns = sk_netns(mode, sk);                                                  \
	if (!bpf_map_lookup_elem(&listeners, &lk) || control_on(CONTROL_CLAIM) ||       \
	    preexisting_sock(mode, sk))                                                 \
		return 0;                                                               \
	peer_key(mode, &key, &sk->__sk_common, FLOW_ROLE_SERVER, lk.port);              \
	return track_in(mode, slot, sk, &key, 0, bpf_ktime_get_ns()) != NULL;           \
}
CLOSE_AT(, READ_PROBE)
CLOSE_AT(_cast, READ_CAST)

/*
 * An entry found at a socket's birth (SYN_SENT: connect(); LISTEN; SYN_RECV made
 * from a listener) belongs to an earlier life of that address: a socket whose end
 * no program saw (the kernel can run a tracepoint without our programs, see
 * sync_retrans: its CLOSE and its destruction both went unseen), freed, its memory
 * reused for this one; or this same socket connecting again after a disconnect
 * (its CLOSE seen, its destruction not come). Kept, it would be taken for the new
 * connection's: the new one's birth and handshake ignored (a client attempt or an
 * accepted handshake never counted), its retransmits and bytes measured against the
 * old one's. It is settled from what it holds (the socket's fields are the new
 * life's now) and forgotten: a close not yet final is finalised as the destroy hook
 * would; an established connection whose close went unseen is counted closed,
 * reason _OTHER, as the sweep counts one (STAT_CLOSE_UNSEEN); a client attempt whose
 * end went unseen failed, _OTHER (the kernel counted it in ActiveOpens); an embryonic
 * accepted socket was discarded (STAT_CHILD_DISCARDED, as on_close counts one).
 * A global function, verified once rather than in every set_state program: the
 * socket passed as a number (no field of it is read: they are the new life's), with
 * its owned_filter slot (see filter_slot: NO_SLOT from the raw_tp copies, which keep no filter).
 */
__noinline int retire_at(__u64 skp, __u32 slot)
{
	struct sock_state *st = bpf_map_lookup_elem(&socks, &skp);
	struct flow_counters *c = NULL;

	if (!st)
		return 0;
	if (st->flags & SF_LISTENER) {
		/* its port may have a newer listener since: only its own registration goes */
		struct listener_key lk = { .netns = st->netns, .port = st->key.port };
		__u64 *owner = bpf_map_lookup_elem(&listeners, &lk);

		if (owner && *owner == skp)
			remove_listener(&lk);
	} else {
		if (!(st->flags & SF_PENDING)) {
			if (st->flags & SF_CLOSED) {
				if (!(st->flags & SF_FINAL))
					finalize_close(st, &c);
			} else if (st->flags & SF_ESTABLISHED) {
				st->flags |= SF_CLOSED | SF_FINAL;
				COUNT_INTO(&c, &st->key, closed, 1);
				COUNT_INTO(&c, &st->key, closes[CLOSE_OTHER], 1);
				stat_inc(STAT_CLOSE_UNSEEN);
			} else if (st->key.role == FLOW_ROLE_CLIENT) {
				COUNT_INTO(&c, &st->key, attempts_failed[CONN_ERR_OTHER], 1);
			} else {
				stat_inc(STAT_CHILD_DISCARDED);
			}
		}
		conn_event(st, FLOW_EVENT_GONE, 0, bpf_ktime_get_ns(), 0);
	}
	drop_entry(slot, skp, st);
	return 0;
}

static __always_inline int handle_set_state(int direct, const struct sock *sk, int oldstate,
					    int newstate)
{
	__u64 skp = (__u64)sk;
	const struct tcp_sock *tp;
	struct sock_state *st;
	struct flow_key key;
	__u64 now;

	/* Every state change on the host: other processes' sockets leave after
	 * one load (owned_filter) unless this may be the birth of one of ours. */
	st = tracked(direct, sk);
	/* A birth (a client's simultaneous open, SYN_SENT -> SYN_RECV, is not one):
	 * an entry already there is an earlier life's (see retire_at) */
	if (st && (newstate == TCP_SYN_SENT || newstate == TCP_LISTEN ||
		   (newstate == TCP_SYN_RECV && oldstate != TCP_SYN_SENT))) {
		retire_at(opaque(skp), filter_slot(direct, sk));
		st = NULL;
	}
	if (!st && newstate != TCP_SYN_SENT && newstate != TCP_LISTEN && newstate != TCP_SYN_RECV &&
	    !(newstate == TCP_CLOSE && established_state(oldstate)))
		return 0;
	if (RD_BITFIELD(direct, sk, sk_protocol) != IPPROTO_TCP)
		return 0;

	if (!st) {
		/* Not ours (yet): the cheapest tests first, the clock only for
		 * a socket this process takes on. */
		if (newstate == TCP_SYN_SENT) {
			if (!owned_by_target())
				return 0;
			now = bpf_ktime_get_ns();
			peer_key(direct, &key, &sk->__sk_common, FLOW_ROLE_CLIENT, 0);
			st = track(direct, sk, &key, 0, now);
			if (st) {
				st->tid = current_tid();
				st->last_tid = st->tid;
				note_use(direct == READ_CAST, st->tid, st, now);
			}
		} else if (newstate == TCP_LISTEN) {
			struct listener_key lk = {};

			if (!owned_by_target())
				return 0;
			__builtin_memset(&key, 0, sizeof(key));
			key.role = FLOW_ROLE_SERVER;
			key.port = RD(direct, sk, __sk_common.skc_num);
			st = track(direct, sk, &key, SF_LISTENER, bpf_ktime_get_ns());
			lk.netns = sk_netns(direct, sk);
			lk.port = key.port;
			if (st)
				add_listener(&lk, skp);
		} else if (newstate == TCP_SYN_RECV) {
			/* An accepted socket is born in softirq: it is ours if its
			 * listener is. The port's filter slot first. */
			struct listener_key lk = {
				.port = RD(direct, sk, __sk_common.skc_num),
			};

			if (!listen_filter[listen_slot(lk.port)])
				return 0;
			lk.netns = sk_netns(direct, sk);
			if (!bpf_map_lookup_elem(&listeners, &lk))
				return 0;
			peer_key(direct, &key, &sk->__sk_common, FLOW_ROLE_SERVER, lk.port);
			if (!track(direct, sk, &key, control_on(CONTROL_CLAIM) ? SF_PENDING : 0,
				   bpf_ktime_get_ns())) {
				/* counted in STAT_SOCKS_FULL: not to be found "unseen" later */
				__u64 id = sock_identity(direct, sk);

				bpf_map_update_elem(&evicted, &skp, &id, BPF_ANY);
			}
		} else if (on_our_listen_port(direct, sk) &&
			   /* the cheap test inline: every established socket's CLOSE on the host comes here */
			   CALL_AT(direct, closed_unseen_at, opaque(skp), filter_slot(direct, sk))) {
			CALL_AT(direct, on_close_at, opaque(skp), oldstate, filter_slot(direct, sk));
		}
		return 0;
	}

	if (newstate == TCP_ESTABLISHED && !(st->flags & SF_ESTABLISHED)) {
		tp = tcp_of(direct, sk);
		if (tp)
			on_established(direct, sk, tp, st, bpf_ktime_get_ns());
		return 0;
	}
	if (newstate == TCP_FIN_WAIT1 || newstate == TCP_LAST_ACK)
		st->flags |= SF_FIN_SENT;
	if (newstate != TCP_CLOSE)
		return 0;

	if (st->flags & SF_LISTENER) {
		listener_drops(direct, sk, st);
		forget(direct, sk, st);
		return 0;
	}
	if (!(st->flags & SF_CLOSED))
		CALL_AT(direct, on_close_at, opaque(skp), oldstate, filter_slot(direct, sk));
	return 0;
}

static __always_inline int handle_destroy(int direct, const struct sock *sk)
{
	struct sock_state *st = tracked(direct, sk);
	struct flow_counters *c = NULL;

	if (!st)
		return 0;
	if (!(st->flags & (SF_CLOSED | SF_LISTENER))) {
		/* Its CLOSE transition was skipped (see NESTED). The socket is dead
		 * here (inet_csk_destroy_sock), so on_close() mostly finalises and
		 * forgets it itself; what it leaves is settled below. */
		if (CALL_AT(direct, on_close_at, opaque((__u64)sk), -1, filter_slot(direct, sk)))
			return 0;
		st = tracked(direct, sk);
		if (!st)
			return 0;
	}
	if ((st->flags & SF_CLOSED) && !(st->flags & (SF_FINAL | SF_PENDING)))
		finalize_close(st, &c);
	forget(direct, sk, st);
	return 0;
}

static __always_inline __u32 skb_segs(const struct sk_buff *skb)
{
	const struct tcp_skb_cb *cb = (const struct tcp_skb_cb *)__builtin_preserve_access_index(&skb->cb);
	__u16 segs = BPF_CORE_READ(cb, tcp_gso_segs);

	return segs ? segs : 1;
}

static __always_inline int handle_retransmit(int direct, const struct sock *sk, const struct sk_buff *skb, int err)
{
	struct flow_counters *c = NULL;
	const struct tcp_sock *tp;
	struct sock_state *st;
	__u32 segs;

	if (err == -EBUSY)	/* the original still in the host queue: nothing counted */
		return 0;
	st = tracked(direct, sk);
	if (!st || (st->flags & SF_PENDING))	/* a claim takes tcp_sock.total_retrans */
		return 0;
	tp = tcp_of(direct, sk);
	if (!tp)
		return 0;
	segs = skb_segs(skb);
	if (st->key.role == FLOW_ROLE_SERVER && !(st->flags & SF_ESTABLISHED)) {
		/* Its ESTABLISHED went unseen, so no baseline: total_retrans also
		 * holds its request's SYN-ACK retransmits, counted on the listener. */
		st->retrans_segs += segs;
		COUNT_INTO(&c, &st->key, retrans_segs, segs);
	} else {
		/* Exactly what the kernel counted (nothing for a retransmit that
		 * failed before it was counted), and any earlier one never seen. */
		segs = sync_retrans(RD(direct, tp, total_retrans), st, segs, &c);
		if (!segs)
			return 0;
	}
	conn_event(st, FLOW_EVENT_RETRANSMIT, 0, bpf_ktime_get_ns(), segs);
	return 0;
}

static __always_inline int handle_retransmit_synack(int direct, const struct sock *listener,
						    const struct request_sock *req)
{
	struct sock_state *st = tracked(direct, listener);
	struct flow_key key;

	if (!st || !(st->flags & SF_LISTENER))
		return 0;
	/* Claim mode: the accepted socket inherits these in total_retrans. */
	if (control_on(CONTROL_CLAIM))
		return 0;
	peer_key(direct, &key, &req->__req_common, FLOW_ROLE_SERVER, st->key.port);
	COUNT(&key, retrans_segs, 1);
	note_synack(&key, bpf_ntohs(RD(direct, &req->__req_common, skc_dport)), st->netns);
	return 0;
}

static __always_inline int handle_reset(int direct, const struct sock *sk, __u8 flag)
{
	struct sock_state *st;

	if (!sk)
		return 0;
	st = tracked(direct, sk);
	if (!st || (st->flags & SF_LISTENER))
		return 0;
	st->flags |= flag;
	if (st->flags & SF_PENDING)	/* counted at the claim */
		return 0;
	if (flag == SF_RST_SENT)
		COUNT(&st->key, resets_sent, 1);
	else
		COUNT(&st->key, resets_received, 1);
	conn_event(st, FLOW_EVENT_RESET, flag == SF_RST_SENT ? FLOW_DIR_TRANSMIT : FLOW_DIR_RECEIVE,
		   bpf_ktime_get_ns(), 1);
	return 0;
}

struct tcphdr_min {
	__be16 source;
	__be16 dest;
	__be32 seq;
	__be32 ack_seq;
	__u16 flags;
	__be16 window;
};

#define TCP_FLAG_RST 0x0004	/* in the flags word, host order */

static __always_inline int handle_probe(int direct, const struct sock *sk, const struct sk_buff *skb)
{
	const struct tcp_sock *tp;
	struct sock_state *st;
	struct tcphdr_min th;
	unsigned char *data;
	__u64 skp = (__u64)sk;
	bool peer_zero, rst;
	__u32 rcv_wnd;

	/* tcp_probe: a full TCP socket, read before the lookup (see zero_win_marks) */
	if (!maybe_tracked(direct, sk))
		return 0;
	tp = tcp_of(direct, sk);
	if (!tp)
		return 0;
	if (direct == READ_CAST) {
		const struct tcphdr *h = CAST(const struct tcphdr, skb->data);

		th.window = h->window;
		th.flags = BPF_CORE_READ_BITFIELD(h, rst) ? bpf_htons(TCP_FLAG_RST) : 0;
	} else {
		data = RD(direct, skb, data);	/* untyped to the verifier: a probe read */
		if (bpf_probe_read_kernel(&th, sizeof(th), data))
			return 0;
	}
	/* The peer's window: this segment's, or (for a window the peer advertised
	 * in a segment coalesced away) the one the socket last recorded. */
	rst = bpf_ntohs(th.flags) & TCP_FLAG_RST;
	peer_zero = !rst && (th.window == 0 || RD(direct, tp, snd_wnd) == 0);
	rcv_wnd = RD(direct, tp, rcv_wnd);
	if (!peer_zero && rcv_wnd && !zero_win_marks)
		return 0;	/* no episode starts, and none of ours is in one to end */
	st = bpf_map_lookup_elem(&socks, &skp);
	if (!st || (st->flags & SF_PENDING))
		return 0;
	if (peer_zero) {
		if (!(st->flags & SF_PEER_ZERO_WIN)) {
			st->flags |= SF_PEER_ZERO_WIN;
			__sync_fetch_and_add(&zero_win_marks, 1);
			COUNT(&st->key, zero_window_rx, 1);
			conn_event(st, FLOW_EVENT_ZERO_WINDOW, FLOW_DIR_RECEIVE, bpf_ktime_get_ns(), 1);
		}
	} else if (!rst && (st->flags & SF_PEER_ZERO_WIN)) {
		st->flags &= ~SF_PEER_ZERO_WIN;
		__sync_fetch_and_sub(&zero_win_marks, 1);
	}
	if (rcv_wnd == 0) {
		if (!(st->flags & SF_OUR_ZERO_WIN)) {
			st->flags |= SF_OUR_ZERO_WIN;
			__sync_fetch_and_add(&zero_win_marks, 1);
			COUNT(&st->key, zero_window_tx, 1);
			conn_event(st, FLOW_EVENT_ZERO_WINDOW, FLOW_DIR_TRANSMIT, bpf_ktime_get_ns(), 1);
		}
	} else if (st->flags & SF_OUR_ZERO_WIN) {
		st->flags &= ~SF_OUR_ZERO_WIN;
		__sync_fetch_and_sub(&zero_win_marks, 1);
	}
	return 0;
}

/*
 * Claim mode: this process reads or writes an accepted socket still pending,
 * so it is the one that accepted it. What happened before is counted now.
 */
static __always_inline void claim(int direct, struct sock_state *st, const struct tcp_sock *tp, __u32 tid)
{
	struct flow_counters *c = NULL;
	__u32 retrans;
	__u8 reason;

	st->flags &= ~SF_PENDING;
	st->tid = tid;
	if (!(st->flags & SF_ESTABLISHED))
		return;
	if (st->flags & SF_UNSEEN)
		stat_inc(STAT_HANDSHAKE_UNSEEN);
	reason = count_established(st, &c);
	conn_event(st, FLOW_EVENT_CONN, reason, st->established_ns, st->handshake_ns);
	/* SYN-ACK retransmits of its request included, as the kernel counts them */
	retrans = RD(direct, tp, total_retrans);
	if (retrans) {
		st->retrans_segs = retrans;
		COUNT_INTO(&c, &st->key, retrans_segs, retrans);
	}
	if (st->flags & SF_RST_SENT)
		COUNT_INTO(&c, &st->key, resets_sent, 1);
	if (st->flags & SF_RST_RECEIVED)
		COUNT_INTO(&c, &st->key, resets_received, 1);
	if (st->flags & SF_CLOSED)
		count_closed(direct, tp, st, &c);
}

/*
 * A connection accepted on one of our listeners that no program saw become
 * established, taken on at its first read or write by this process: one whose
 * handshake the kernel ran no program for (see late_established), or, in
 * claim mode only, one that completed before these probes were loaded (a
 * forked worker accepting from the queue it shares with its parent, whose own
 * probes hold it pending for whoever uses it), as established from the start
 * (the kernel's byte counts of a passive socket start at 0 at ESTABLISHED),
 * unless the parent counted it before the fork. In claim mode it is pending
 * (claimed by the caller).
 */
static __always_inline struct sock_state *adopt_accepted(int direct, __u32 slot, const struct sock *sk)
{
	struct listener_key lk = {};
	struct sock_state *st;
	struct flow_key key;
	__u64 skp = (__u64)sk;
	const struct tcp_sock *tp;
	bool claiming, unseen;
	int state;

	claiming = control_on(CONTROL_CLAIM);
	if (!claiming && !span_mode)
		return NULL;
	lk.port = RD(direct, sk, __sk_common.skc_num);
	if (!listen_filter[listen_slot(lk.port)])
		return NULL;
	if (RD_BITFIELD(direct, sk, sk_protocol) != IPPROTO_TCP)
		return NULL;
	state = RD(direct, sk, __sk_common.skc_state);
	if (state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT)
		return NULL;
	lk.netns = sk_netns(direct, sk);
	if (!bpf_map_lookup_elem(&listeners, &lk) || bpf_map_lookup_elem(&parents, &skp) ||
	    !owned_by_target())
		return NULL;
	unseen = !preexisting_sock(direct, sk);
	/* in its accept queue at load: not counted, as before; no room at SYN_RECV: counted so */
	if (!unseen && (!claiming || marked(&evicted, direct, sk)))
		return NULL;
	tp = tcp_of(direct, sk);
	if (!tp)
		return NULL;
	peer_key(direct, &key, &sk->__sk_common, FLOW_ROLE_SERVER, lk.port);
	st = track_in(direct, slot, sk, &key, claiming ? SF_PENDING : 0, bpf_ktime_get_ns());
	if (!st)
		return NULL;
	if (unseen) {
		CALL_AT(direct, late_established_at, opaque((__u64)sk), st->start_ns, state);
	} else {
		st->flags |= SF_ESTABLISHED;
		st->established_ns = st->start_ns;
	}
	return st;
}

/*
 * adopt_accepted() and claim() as global functions (see SOCK_VIEW): rare
 * paths, at most once per connection, which the verifier then checks once per
 * program instead of on every path of the send and receive programs.
 * adopt_accepted_at() returns whether the socket is tracked now.
 */
#define ADOPT_AT(suffix, mode)                                                          \
__noinline int adopt_accepted_at##suffix(__u64 skp, __u32 slot)                         \
{                                                                                       \
	return adopt_accepted(mode, slot, SOCK_VIEW(mode, skp)) != NULL;                \
}                                                                                       \
                                                                                        \
__noinline int claim_at##suffix(__u64 skp, __u32 tid)                                   \
{                                                                                       \
	struct sock_state *st = bpf_map_lookup_elem(&socks, &skp);                      \
	const struct tcp_sock *tp = tcp_of(mode, SOCK_VIEW(mode, skp));                  \
                                                                                        \
	if (st && tp)                                                                   \
		claim(mode, st, tp, tid);                                               \
	return 0;                                                                       \
}
ADOPT_AT(, READ_PROBE)
ADOPT_AT(_cast, READ_CAST)

/*
 * A send or receive by a thread (process context), on every TCP socket of the
 * host while attached: attached for span enrichment (span_mode: which
 * connection the thread used, when, and its RTT then, while a span is open) and, once user space
 * turns claim mode on, for claims. One program per tracepoint serves both, so
 * a pre-fork server pays one run per send. Other processes' sockets leave
 * after one load (owned_filter); SF_PENDING exists only in claim mode.
 */
static __always_inline int handle_sock_io(int direct, const struct sock *sk)
{
	const struct tcp_sock *tp;
	struct sock_state *st;
	__u32 tid;

	if (!sk)
		return 0;
	/* No span open and no claims: nothing to note (a connection whose
	 * handshake went unseen is then found by the iterator or at its close,
	 * as without span enrichment). Every send and receive on the host comes
	 * here: one load, before the filter. */
	if (span_mode && !spans_open() && !control_on(CONTROL_CLAIM))
		return 0;
	st = tracked(direct, sk);
	/* the cheap tests inline */
	if (!st && (span_mode || control_on(CONTROL_CLAIM)) && on_our_listen_port(direct, sk) &&
	    CALL_AT(direct, adopt_accepted_at, opaque((__u64)sk), filter_slot(direct, sk)))
		st = tracked(direct, sk);
	if (!st || (st->flags & SF_LISTENER) || !(span_mode || (st->flags & SF_PENDING)) ||
	    !owned_by_target())
		return 0;
	tp = tcp_of(direct, sk);
	if (!tp)
		return 0;
	tid = current_tid();	/* no pid namespace walk outside containers */
	if (!(st->flags & (SF_ESTABLISHED | SF_CLOSED))) {
		int state = RD(direct, sk, __sk_common.skc_state);

		if (established_state(state))	/* its ESTABLISHED went unseen */
			CALL_AT(direct, late_established_at, opaque((__u64)sk), bpf_ktime_get_ns(), state);
	}
	if (st->flags & SF_PENDING)
		CALL_AT(direct, claim_at, opaque((__u64)sk), tid);
	if (!span_mode)
		return 0;
	st->last_tid = tid;
	st->srtt_us = read_srtt_us(direct, tp);
	if (control_on(CONTROL_SPANS))	/* attached for claims only so far */
		note_use(true, tid, st, bpf_ktime_get_ns());	/* 6.3+ */
	return 0;
}

/* --- attach points: tp_btf, and raw_tp copies loaded only where tp_btf is not --- */

/*
 * Main programs mark their hook busy on this CPU while they run (a count: a
 * jumping nested copy runs the main program's code again inside it, see
 * JUMP_HOOK). The nested copy of a hook (same tracepoint, attached as well) acts
 * only when it finds the hook busy here: for an event raised while the main
 * program was interrupted on this CPU, which the kernel skipped for the main
 * program. Otherwise it returns at once, so every event is handled exactly
 * once.
 */
#define MAIN(hook, call)                                                        \
	({                                                                      \
		__u32 __h = (hook);                                             \
		__u32 *__b = bpf_map_lookup_elem(&busy, &__h);                  \
		int __r;                                                        \
		if (__b)                                                        \
			*__b += 1;                                              \
		__r = (call);                                                   \
		if (__b)                                                        \
			*__b -= 1;                                              \
		__r;                                                            \
	})
#define NESTED(hook, call)                                                      \
	({                                                                      \
		__u32 __h = (hook);                                             \
		__u32 *__b = bpf_map_lookup_elem(&busy, &__h);                  \
		__u64 *__n;                                                     \
		int __r = 0;                                                    \
		if (__b && *__b) {                                              \
			__n = bpf_map_lookup_elem(&rescued, &__h);              \
			if (__n)                                                \
				__sync_fetch_and_add(__n, 1);                   \
			__r = (call);                                           \
		}                                                               \
		__r;                                                            \
	})

/* The TCP hooks. WRAP is MAIN for the programs that run first, NESTED for
 * their nested copies (suffix _nested). */
#define TCP_HOOKS(kind, suffix, direct, WRAP)                                                   \
SEC(#kind "/tcp_destroy_sock")                                                                 \
int BPF_PROG(kind##_destroy_sock##suffix, const struct sock *sk)                               \
{ return WRAP(HOOK_DESTROY_SOCK, handle_destroy(direct, sk)); }                                \
SEC(#kind "/tcp_retransmit_skb")                                                               \
int BPF_PROG(kind##_retransmit_skb##suffix, const struct sock *sk, const struct sk_buff *skb)  \
{ return WRAP(HOOK_RETRANSMIT_SKB, handle_retransmit(direct, sk, skb, 0)); }                   \
SEC(#kind "/tcp_retransmit_skb")                                                               \
int BPF_PROG(kind##_retransmit_skb_err##suffix, const struct sock *sk, const struct sk_buff *skb, \
	     int err)                                                                          \
{ return WRAP(HOOK_RETRANSMIT_SKB, handle_retransmit(direct, sk, skb, err)); }                 \
SEC(#kind "/tcp_retransmit_synack")                                                            \
int BPF_PROG(kind##_retransmit_synack##suffix, const struct sock *sk,                          \
	     const struct request_sock *req)                                                   \
{ return WRAP(HOOK_RETRANSMIT_SYNACK, handle_retransmit_synack(direct, sk, req)); }            \
SEC(#kind "/tcp_send_reset")                                                                   \
int BPF_PROG(kind##_send_reset##suffix, const struct sock *sk)                                 \
{ return WRAP(HOOK_SEND_RESET, handle_reset(direct, sk, SF_RST_SENT)); }                       \
SEC(#kind "/tcp_receive_reset")                                                                \
int BPF_PROG(kind##_receive_reset##suffix, const struct sock *sk)                              \
{ return WRAP(HOOK_RECEIVE_RESET, handle_reset(direct, sk, SF_RST_RECEIVED)); }

/* The TCP hooks that use bpf_rdonly_cast in their READ_CAST build (a _nocast
 * copy of each probe-reads instead, for kernels before 6.2). */
#define STATE_HOOK(kind, suffix, direct, WRAP)                                                  \
SEC(#kind "/inet_sock_set_state")                                                              \
int BPF_PROG(kind##_set_state##suffix, const struct sock *sk, int oldstate, int newstate)      \
{ return WRAP(HOOK_SET_STATE, handle_set_state(direct, sk, oldstate, newstate)); }
/*
 * Every segment received on the host: no nested copy, and so no busy mark.
 * What it keeps is state re-read from each segment (the peer's window and
 * ours), so a segment the kernel skipped it for is caught up at the
 * connection's next one; the skipped runs still count as lost (recursion
 * misses, nothing rescued). A nested copy cost every received segment one
 * more program run for that.
 */
#define PROBE_HOOK(kind, suffix, direct)                                                        \
SEC(#kind "/tcp_probe")                                                                        \
int BPF_PROG(kind##_probe##suffix, const struct sock *sk, const struct sk_buff *skb)          \
{ return handle_probe(direct, sk, skb); }

/* Send and receive (span enrichment and claims): no nested copies. */
#define IO_HOOKS(kind, direct)                                                                  \
SEC(#kind "/sock_send_length")                                                                 \
int BPF_PROG(kind##_send_length, const struct sock *sk, int ret, int flags)                    \
{ return handle_sock_io(direct, sk); }                                                         \
SEC(#kind "/sock_recv_length")                                                                 \
int BPF_PROG(kind##_recv_length, const struct sock *sk, int ret, int flags)                    \
{ return handle_sock_io(direct, sk); }

/*
 * Whether a segment freed with `reason` on a listener's behalf was charged to
 * its sk_drops (see listener_drops). Measured on 6.18 against the listener's
 * sk_drops: charged are the discards of tcp_v4_rcv/tcp_v6_rcv for a listener or
 * its requests (no reason set: a repeated SYN or ACK, an RST to a request; the
 * checks of tcp_check_req; filters, policy, signatures, min TTL) and of
 * tcp_rcv_state_process (an RST, SYN+FIN or flagless segment to the listener).
 * Not charged: a segment with ACK set that the listener answers with a reset
 * (TCP_FLAGS from tcp_v4_do_rcv), a failed SYN-cookie ACK (NO_SOCKET: a cookie
 * ACK that overflows is charged by tcp_listendrop alone), bad checksums. A
 * reason not listed is taken as not charged: an unknown drop then shows as an
 * overflow, as before, never hides one.
 */
static __always_inline bool charged_to_listener(enum skb_drop_reason reason, const struct sk_buff *skb)
{
	__u8 flags = 0;

	if (reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_TCP_FLAGS)) {
		const unsigned char *head = BPF_CORE_READ(skb, head);
		__u16 th = BPF_CORE_READ(skb, transport_header);

		if (bpf_probe_read_kernel(&flags, 1, head + th + 13))
			return false;
		return !(flags & 0x10);	/* no ACK: dropped by tcp_rcv_state_process */
	}
#define CHARGED(name)                                                                   \
	(bpf_core_enum_value_exists(enum skb_drop_reason, SKB_DROP_REASON_##name) &&     \
	 reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_##name))
	return CHARGED(NOT_SPECIFIED) || CHARGED(TCP_RESET) || CHARGED(SOCKET_FILTER) ||
	       CHARGED(XFRM_POLICY) || CHARGED(TCP_MINTTL) || CHARGED(TCP_MD5NOTFOUND) ||
	       CHARGED(TCP_MD5UNEXPECTED) || CHARGED(TCP_MD5FAILURE) || CHARGED(TCP_AONOTFOUND) ||
	       CHARGED(TCP_AOUNEXPECTED) || CHARGED(TCP_AOKEYNOTFOUND) || CHARGED(TCP_AOFAILURE) ||
	       CHARGED(TCP_AUTH_HDR) || CHARGED(TCP_RFC7323_PAWS) || CHARGED(TCP_RFC7323_TSECR) ||
	       CHARGED(TCP_OVERWINDOW) || CHARGED(TCP_LISTEN_OVERFLOW);
#undef CHARGED
}

/*
 * Every freed packet on the host (rare next to the hooks above): most have no
 * receiving socket or one that is not listening, and leave after a load or two.
 * One of our listeners' drops that was no overflow is added to what its
 * sk_drops already accounts for. Loaded only where the tracepoint has rx_sk.
 */
SEC("tp_btf/kfree_skb")
int BPF_PROG(tp_btf_kfree_skb, const struct sk_buff *skb, void *location, enum skb_drop_reason reason,
	     const struct sock *rx_sk)
{
	struct sock_state *st;

	if (!rx_sk || rx_sk->__sk_common.skc_state != TCP_LISTEN)
		return 0;
	if (!listen_filter[listen_slot(rx_sk->__sk_common.skc_num)])
		return 0;
	st = tracked(READ_BTF, rx_sk);
	if (!st || !(st->flags & SF_LISTENER) || !charged_to_listener(reason, skb))
		return 0;
	__sync_fetch_and_add(&st->drops, 1);
	return 0;
}

TCP_HOOKS(tp_btf, , READ_BTF, MAIN)
STATE_HOOK(tp_btf, , READ_CAST, MAIN)
STATE_HOOK(tp_btf, _nocast, READ_BTF, MAIN)
PROBE_HOOK(tp_btf, , READ_CAST)
PROBE_HOOK(tp_btf, _nocast, READ_BTF)
IO_HOOKS(tp_btf, READ_BTF)
TCP_HOOKS(raw_tp, , READ_PROBE, MAIN)
STATE_HOOK(raw_tp, , READ_PROBE, MAIN)
PROBE_HOOK(raw_tp, , READ_PROBE)
IO_HOOKS(raw_tp, READ_PROBE)

/* The nested copies (see MAIN and NESTED above), each built as its main
 * program is (the cast ones verify faster: bpf_loop, no probe reads). */
TCP_HOOKS(tp_btf, _nested, READ_BTF, NESTED)
STATE_HOOK(tp_btf, _nested, READ_CAST, NESTED)
STATE_HOOK(tp_btf, _nocast_nested, READ_BTF, NESTED)
TCP_HOOKS(raw_tp, _nested, READ_PROBE, NESTED)
STATE_HOOK(raw_tp, _nested, READ_PROBE, NESTED)

/*
 * Nested copies that continue in their main program (tp_btf, where the kernel
 * allows the tail call): the same events handled by the same code, with a
 * program of a few instructions to verify instead of a second copy of the
 * main one (most of a start's verification time). The kernel's recursion
 * check is per program and a tail call does not pass through it, so the main
 * program's code runs again inside the nested one. One program array per
 * tracepoint: a tracing program may tail-call only programs attached where it
 * is. User space fills slot 0 with the main program after the load and, if the
 * kernel refuses, loads the full nested copies instead. An empty slot (the
 * call falls through) takes nothing back: the event is counted lost.
 */
static __always_inline int jump_to_main(void *ctx, void *jumps, __u32 hook)
{
	__u64 *n;

	bpf_tail_call(ctx, jumps, 0);
	/* an empty slot: the rescue NESTED counted is taken back */
	n = bpf_map_lookup_elem(&rescued, &hook);
	if (n)
		__sync_fetch_and_sub(n, 1);
	return 0;
}

#define JUMP_HOOK(hook, tp, hook_id)                                            \
struct {                                                                        \
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);                                  \
	__uint(max_entries, 1);                                                 \
	__type(key, __u32);                                                     \
	__type(value, __u32);                                                   \
} jump_##hook SEC(".maps");                                                     \
SEC("tp_btf/" #tp)                                                              \
int tp_btf_##hook##_jump(void *ctx)                                             \
{ return NESTED(hook_id, jump_to_main(ctx, &jump_##hook, hook_id)); }
JUMP_HOOK(set_state, inet_sock_set_state, HOOK_SET_STATE)
JUMP_HOOK(destroy_sock, tcp_destroy_sock, HOOK_DESTROY_SOCK)
JUMP_HOOK(retransmit_skb, tcp_retransmit_skb, HOOK_RETRANSMIT_SKB)
JUMP_HOOK(retransmit_synack, tcp_retransmit_synack, HOOK_RETRANSMIT_SYNACK)
JUMP_HOOK(send_reset, tcp_send_reset, HOOK_SEND_RESET)
JUMP_HOOK(receive_reset, tcp_receive_reset, HOOK_RECEIVE_RESET)

/* --- iterator: live sockets --- */

SEC("iter/tcp")
int sample_sockets(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct seq_file *seq = ctx->meta->seq;
	struct sock_state *st;
	struct tcp_sock *tp;
	struct sock *sk;
	__u64 skp, now;

	if (!skc) {
		/* The end of a pass, run by the process that reads the iterator:
		 * if that is the target, owned_by_target() learns its kernel tgid
		 * here, before the process opens any connection of its own. */
		if (!target_host_tgid)
			owned_by_target();
		return 0;
	}
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;	/* time-wait and request sockets */
	sk = (struct sock *)tp;
	skp = (__u64)sk;
	now = bpf_ktime_get_ns();
	st = tracked(READ_BTF, sk);

	if (!st) {
		struct socket *sock;
		__u64 ino = 0;
		struct flow_key key;
		int state = sk->__sk_common.skc_state;
		bool seeding = control_on(CONTROL_SEEDING);

		if (!seeding || !(sock = sk->sk_socket) || !sock->file || !sock->file->f_inode ||
		    !(ino = sock->file->f_inode->i_ino) || !bpf_map_lookup_elem(&seeds, &ino)) {
			/* Not one of this process's sockets at load: one established on
			 * our listener is then one it had not accepted (remembered, never
			 * counted), or later, one whose handshake no program saw (taken on;
			 * in claim mode only when this process uses it). Listeners come
			 * first in a pass: each is known before its connections. */
			struct listener_key lk = { .port = sk->__sk_common.skc_num };
			__u64 id;

			if (!established_state(state) || !listen_filter[listen_slot(lk.port)])
				return 0;
			lk.netns = sk_netns(true, sk);
			if (!bpf_map_lookup_elem(&listeners, &lk))
				return 0;
			if (seeding) {
				id = sock_identity(true, sk);
				bpf_map_update_elem(&preexisting, &skp, &id, BPF_ANY);
				return 0;
			}
			if (control_on(CONTROL_CLAIM) || preexisting_sock(true, sk))
				return 0;
			peer_key(true, &key, skc, FLOW_ROLE_SERVER, lk.port);
			st = track(true, sk, &key, 0, now);
			if (!st)
				return 0;
			late_established_at(opaque((__u64)sk), now, state);
			goto sample;	/* and counted from the start, below */
		} else if (state == TCP_LISTEN) {
			struct listener_key lk = { .netns = sk_netns(true, sk), .port = sk->__sk_common.skc_num };

			__builtin_memset(&key, 0, sizeof(key));
			key.role = FLOW_ROLE_SERVER;
			key.port = lk.port;
			st = track(true, sk, &key, SF_LISTENER, now);
			if (!st)
				return 0;
			add_listener(&lk, skp);
			st->drops = sk->sk_drops.counter;
			/* Claim mode while adopting: a forked child's inherited
			 * listener, whose drops its creator already counts. */
			if (control_on(CONTROL_CLAIM))
				st->flags |= SF_PENDING;
			return 0;
		}
		if (state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT && state != TCP_FIN_WAIT1 &&
		    state != TCP_FIN_WAIT2 && state != TCP_CLOSING && state != TCP_LAST_ACK)
			return 0;
		{
			struct listener_key lk = { .netns = sk_netns(true, sk), .port = sk->__sk_common.skc_num };
			bool server = find_listener(&lk) != NULL;

			peer_key(true, &key, skc, server ? FLOW_ROLE_SERVER : FLOW_ROLE_CLIENT, lk.port);
		}
		st = track(true, sk, &key, SF_ESTABLISHED, now);
		if (!st)
			return 0;
		/* Count only what happens from now on. */
		st->established_ns = now;
		st->bytes_acked = tp->bytes_acked;
		st->bytes_received = tp->bytes_received;
		st->retrans_segs = tp->total_retrans;
		st->srtt_us = tp->srtt_us >> 3;
		COUNT(&key, adopted, 1);
		conn_event(st, FLOW_EVENT_CONN, CONN_ADOPTED, now, 0);
		return 0;
	}

sample:
	st->seen_ns = now;
	if (st->flags & SF_LISTENER) {
		listener_drops(true, sk, st);
		return 0;
	}
	/* a connection whose ESTABLISHED no program ran for */
	if (!(st->flags & (SF_ESTABLISHED | SF_CLOSED)) && established_state(sk->__sk_common.skc_state))
		late_established_at(opaque((__u64)sk), now, sk->__sk_common.skc_state);
	if (!(st->flags & SF_ESTABLISHED) || (st->flags & (SF_CLOSED | SF_PENDING)))
		return 0;
	if (fin_queued_state(sk->__sk_common.skc_state))
		st->flags |= SF_FIN_SENT;	/* see on_close() */
	{
		struct flow_counters *c = NULL;

		account_bytes(true, st, tp, &c);
		sync_retrans(tp->total_retrans, st, 0, &c);
	}
	st->srtt_us = tp->srtt_us >> 3;
	if (st->srtt_us && now - st->last_rtt_ns >= rtt_sample_ns) {
		struct flow_event e = {};

		e.key = st->key;
		e.kind = FLOW_EVENT_RTT;
		e.srtt_us = st->srtt_us;
		e.tid = st->last_tid;
		e.peer_port = st->peer_port;
		e.ts_ns = now;
		e.conn_id = st->conn_id;
		/* A full read buffer (32 KiB: every ~585 records) fails the write and
		 * the kernel shows this socket again in the next read(): mark it
		 * sampled only once its record is written. */
		if (!bpf_seq_write(seq, &e, sizeof(e)))
			st->last_rtt_ns = now;
	}
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
