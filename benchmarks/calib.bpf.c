// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Calibration programs for the per-program cost benchmark: benchmarks/run
 * compiles this with clang at run time and attaches it next to the library's
 * programs, on the same hooks, under the same load, so their run_time_ns /
 * run_cnt read as reference points on this machine:
 *   calib_empty_probe        tp_btf/tcp_probe returning at once: the floor
 *                            (dispatch + bpf_stats accounting)
 *   calib_lookup_probe       one lookup, keyed by the sock pointer, in a
 *                            65536-entry hash map holding no entry: what a
 *                            "not my socket" exit through a hash map costs
 *   calib_storage_probe      the same question asked of socket-local storage
 *                            (bpf_sk_storage_get, no entry)
 *   calib_filter_probe       the same question asked of a counting filter: one
 *                            load from an 8192-slot global array indexed by a
 *                            hash of the pointer (what tcp_flows.bpf.c does
 *                            before its lookup)
 *   calib_helper_reads       three sock/skb fields read with bpf_probe_read_kernel
 *   calib_direct_reads       the same three fields read directly (BTF pointers)
 *   calib_empty_set_state    tp_btf/inet_sock_set_state returning at once
 * Kernel: tp_btf (5.5), socket-local storage from tracing programs (5.11).
 */
#include "vmlinux.h"	/* bpf/vmlinux.h: the kernel types the library is built with */
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

__u64 sink = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} calib_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} calib_storage SEC(".maps");

SEC("tp_btf/tcp_probe")
int BPF_PROG(calib_empty_probe, struct sock *sk, struct sk_buff *skb)
{
	return 0;
}

SEC("tp_btf/tcp_probe")
int BPF_PROG(calib_lookup_probe, struct sock *sk, struct sk_buff *skb)
{
	__u64 skp = (__u64)sk;

	if (bpf_map_lookup_elem(&calib_socks, &skp))
		sink++;
	return 0;
}

SEC("tp_btf/tcp_probe")
int BPF_PROG(calib_storage_probe, struct sock *sk, struct sk_buff *skb)
{
	if (bpf_sk_storage_get(&calib_storage, sk, 0, 0))
		sink++;
	return 0;
}

__u32 calib_filter[8192] = {};

SEC("tp_btf/tcp_probe")
int BPF_PROG(calib_filter_probe, struct sock *sk, struct sk_buff *skb)
{
	__u64 x = (__u64)sk - (__u64)&calib_filter;	/* a pointer cannot be multiplied */

	asm volatile("" : "+r"(x));
	if (calib_filter[(x * 0x9E3779B97F4A7C15ULL) >> 51])
		sink++;
	return 0;
}

SEC("tp_btf/tcp_probe")
int BPF_PROG(calib_helper_reads, struct sock *sk, struct sk_buff *skb)
{
	int rcvbuf = 0, sndbuf = 0;
	unsigned int len = 0;

	bpf_probe_read_kernel(&rcvbuf, sizeof(rcvbuf), &sk->sk_rcvbuf);
	bpf_probe_read_kernel(&sndbuf, sizeof(sndbuf), &sk->sk_sndbuf);
	bpf_probe_read_kernel(&len, sizeof(len), &skb->len);
	sink += rcvbuf + sndbuf + len;
	return 0;
}

SEC("tp_btf/tcp_probe")
int BPF_PROG(calib_direct_reads, struct sock *sk, struct sk_buff *skb)
{
	sink += sk->sk_rcvbuf + sk->sk_sndbuf + skb->len;
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(calib_empty_set_state, struct sock *sk, int oldstate, int newstate)
{
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
