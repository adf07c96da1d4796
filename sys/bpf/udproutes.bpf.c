// SPDX-License-Identifier: Apache-2.0
//
// Datagrams of supervised sockets routed by AID without a supervisor: cgroup
// sock_addr programs attached to a registry's cgroup (every instance of the
// registry lives below it), as Cilium's socket load balancer does it.
//
// sendmsg4/6: a datagram sent with an address (sendto, sendmsg) to a local
// address and a virtual port that an instance of the sender's AID serves
// leaves for that instance's real port. The address is the socket's own
// business and stays; only the port changes, so nothing per packet is
// rewritten below the socket (no NAT, no conntrack binding).
//
// recvmsg4/6: a datagram received from a local address and an instance's
// real port shows the virtual port as its source, so a reply looks as if it
// came from where the request went.
//
// Everything else passes untouched: other protocols, other ports, remote
// addresses, AIDs with no instance on the port (those are refused by the
// registry's nftables rules, as from a closed port). Connected sockets are
// connected to the real port by the supervisor, which is notified of
// connect.
//
// The maps are filled by the supervisor from the registry
// (runtime/src/net/udproutes.rs); the key layouts are mirrored by repr(C) types
// in sys/src/udpbpf.rs.

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define SOCK_DGRAM 2

// Set by the loader: the depth of an AID's cgroup below the cgroup2 root.
volatile const __u32 aid_level = 3;

struct route_key {
	__u64 aid;	// cgroup id of the sender's AID directory
	__u32 addr[4];	// destination, IPv4 as ::ffff:a.b.c.d; a wildcard is
			// :: (IPv6) or ::ffff:0.0.0.0 (IPv4)
	__u32 port;	// virtual port, host order
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct route_key);
	__type(value, __u32);	// real port, host order
} routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);	// real port, host order
	__type(value, __u32);	// virtual port, host order
} reverse SEC(".maps");

// An address as in route_key.
struct addr {
	__u32 addr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct addr);	// a local address of the host
	__type(value, __u32);
} locals SEC(".maps");

static __always_inline int is_udp(struct bpf_sock_addr *ctx)
{
	return ctx->type == SOCK_DGRAM && ctx->protocol == IPPROTO_UDP;
}

static __always_inline void from_ip4(struct addr *a, __u32 ip4)
{
	a->addr[0] = 0;
	a->addr[1] = 0;
	a->addr[2] = bpf_htonl(0xffff);
	a->addr[3] = ip4;
}

static __always_inline void from_ip6(struct addr *a, struct bpf_sock_addr *ctx)
{
	a->addr[0] = ctx->user_ip6[0];
	a->addr[1] = ctx->user_ip6[1];
	a->addr[2] = ctx->user_ip6[2];
	a->addr[3] = ctx->user_ip6[3];
}

static __always_inline int is_v4(const struct addr *a)
{
	return a->addr[0] == 0 && a->addr[1] == 0 && a->addr[2] == bpf_htonl(0xffff);
}

// Loopback is always local; other addresses are the host's as the
// supervisor last read them.
static __always_inline int is_local(struct addr *a)
{
	if (is_v4(a) && (a->addr[3] & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000))
		return 1;
	if (a->addr[0] == 0 && a->addr[1] == 0 && a->addr[2] == 0 && a->addr[3] == bpf_htonl(1))
		return 1;
	return bpf_map_lookup_elem(&locals, a) != NULL;
}

static __always_inline void send(struct bpf_sock_addr *ctx, struct addr *dest)
{
	struct route_key key = {};
	__u32 *real;

	key.aid = bpf_get_current_ancestor_cgroup_id(aid_level);
	key.port = bpf_ntohs(ctx->user_port);
	key.addr[0] = dest->addr[0];
	key.addr[1] = dest->addr[1];
	key.addr[2] = dest->addr[2];
	key.addr[3] = dest->addr[3];
	real = bpf_map_lookup_elem(&routes, &key);
	if (!real) {
		// A wildcard socket receives on every local address, and on no
		// other host's.
		if (!is_local(dest))
			return;
		if (is_v4(dest)) {
			key.addr[3] = 0;
		} else {
			key.addr[0] = 0;
			key.addr[1] = 0;
			key.addr[2] = 0;
			key.addr[3] = 0;
		}
		real = bpf_map_lookup_elem(&routes, &key);
	}
	if (real)
		ctx->user_port = bpf_htons(*real);
}

static __always_inline void receive(struct bpf_sock_addr *ctx, struct addr *src)
{
	__u32 port = bpf_ntohs(ctx->user_port);
	__u32 *virtual;

	if (!is_local(src))
		return;
	virtual = bpf_map_lookup_elem(&reverse, &port);
	if (virtual)
		ctx->user_port = bpf_htons(*virtual);
}

SEC("cgroup/sendmsg4")
int sendmsg4(struct bpf_sock_addr *ctx)
{
	struct addr dest;

	if (is_udp(ctx)) {
		from_ip4(&dest, ctx->user_ip4);
		send(ctx, &dest);
	}
	return 1;
}

SEC("cgroup/sendmsg6")
int sendmsg6(struct bpf_sock_addr *ctx)
{
	struct addr dest;

	if (is_udp(ctx)) {
		from_ip6(&dest, ctx);
		send(ctx, &dest);
	}
	return 1;
}

SEC("cgroup/recvmsg4")
int recvmsg4(struct bpf_sock_addr *ctx)
{
	struct addr src;

	if (is_udp(ctx)) {
		from_ip4(&src, ctx->user_ip4);
		receive(ctx, &src);
	}
	return 1;
}

SEC("cgroup/recvmsg6")
int recvmsg6(struct bpf_sock_addr *ctx)
{
	struct addr src;

	if (is_udp(ctx)) {
		from_ip6(&src, ctx);
		receive(ctx, &src);
	}
	return 1;
}

char LICENSE[] SEC("license") = "Apache-2.0";
