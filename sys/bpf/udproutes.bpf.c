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
// connect, or by connect4/6 below for kernel-routed instances.
//
// The maps are filled by the supervisor from the registry
// (runtime/src/net/udproutes.rs); the key layouts are mirrored by repr(C) types
// in sys/src/udpbpf.rs.

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define ECONNREFUSED 111

// Set by the loader: the depth of an AID's cgroup below the cgroup2 root
// (an instance's is one deeper).
volatile const __u32 aid_level = 3;

struct route_key {
	__u64 aid;	// cgroup id of the sender's AID directory
	__u32 addr[4];	// destination, IPv4 as ::ffff:a.b.c.d; a wildcard is
			// :: (IPv6) or ::ffff:0.0.0.0 (IPv4)
	__u32 port;	// virtual port, host order
	__u32 pad;
};

// Not preallocated (nor are the hash maps below): 65,536 elements made
// ahead cost 12 ms each when the maps are created, on the start of the
// first instance, and lookups are the same either way (only the
// supervisor's updates allocate).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct route_key);
	__type(value, __u32);	// real port, host order
} routes SEC(".maps");

// What a port is to the datagram programs, read with no hashing (an
// array lookup the verifier inlines): every datagram of every supervised
// socket passes them, and most ports are neither virtual nor real (a
// server's reply to a client's ephemeral port), so those leave after one
// load. The supervisor writes it through a mapping (BPF_F_MMAPABLE).
struct port {
	__u32 virtual_port;	// a real port: the virtual port it stands for
	__u32 routed;		// ROUTED_*: the kinds of routes with this
				// virtual port
};

#define ROUTED_EXACT 1		// a route for a socket's own address
#define ROUTED_WILDCARD 2	// a route for a wildcard socket

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);	// port, host order
	__type(value, struct port);
} ports SEC(".maps");

// An address as in route_key.
struct addr {
	__u32 addr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
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
	__u32 port = bpf_ntohs(ctx->user_port);
	struct route_key key = {};
	struct port *p;
	__u32 *real;

	p = bpf_map_lookup_elem(&ports, &port);
	if (!p || !p->routed)
		return;
	key.aid = bpf_get_current_ancestor_cgroup_id(aid_level);
	key.port = port;
	// Servers mostly bind a wildcard: the lookup of the address itself is
	// made only where some socket on the port has one.
	if (p->routed & ROUTED_EXACT) {
		key.addr[0] = dest->addr[0];
		key.addr[1] = dest->addr[1];
		key.addr[2] = dest->addr[2];
		key.addr[3] = dest->addr[3];
		real = bpf_map_lookup_elem(&routes, &key);
		if (real) {
			ctx->user_port = bpf_htons(*real);
			return;
		}
	}
	// A wildcard socket receives on every local address, and on no other
	// host's.
	if (!(p->routed & ROUTED_WILDCARD) || !is_local(dest))
		return;
	if (is_v4(dest)) {
		key.addr[0] = 0;
		key.addr[1] = 0;
		key.addr[2] = bpf_htonl(0xffff);
		key.addr[3] = 0;
	} else {
		key.addr[0] = 0;
		key.addr[1] = 0;
		key.addr[2] = 0;
		key.addr[3] = 0;
	}
	real = bpf_map_lookup_elem(&routes, &key);
	if (real)
		ctx->user_port = bpf_htons(*real);
}

static __always_inline void receive(struct bpf_sock_addr *ctx, struct addr *src)
{
	__u32 port = bpf_ntohs(ctx->user_port);
	struct port *p;

	p = bpf_map_lookup_elem(&ports, &port);
	if (!p || !p->virtual_port || !is_local(src))
		return;
	ctx->user_port = bpf_htons(p->virtual_port);
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

// Connections and names of the instances whose supervisor left them to the
// kernel (connect, getsockname and getpeername are then not notified):
// the registry's routing decisions, precomputed per destination class by
// the supervisor from the same policy it applies to a notified call
// (runtime/src/net/connroutes.rs). Instances not in `routed` are untouched:
// their supervisor answers those calls itself.

#define CLASS_EXACT 0	// this very address
#define CLASS_OTHER4 1	// any local IPv4 address without an exact entry
#define CLASS_OTHER6 2	// any local IPv6 address without an exact entry

struct class_key {
	__u64 aid;	// cgroup id of the caller's AID directory; 0 for an AID
			// with no entry of its own
	__u32 addr[4];	// CLASS_EXACT: as route_key; otherwise zero
	__u32 port;	// destination port, host order
	__u8 protocol;	// IPPROTO_TCP or IPPROTO_UDP
	__u8 class;
	__u16 pad;
};

#define PASS 0
#define REFUSE 1
#define TO 2
#define GROUP_MAX 64

struct conn_route {
	__u32 action;
	__u32 count;	// TO: real ports in `ports`, one per instance, in
			// owner order
	__u16 ports[GROUP_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct class_key);
	__type(value, struct conn_route);
} connects SEC(".maps");

// The virtual port a real port stands for; `aid` is always 0 (a name does
// not depend on who asks).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct class_key);
	__type(value, __u32);
} names SEC(".maps");

// The instance cgroups (ids) whose calls the kernel routes.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, __u32);
} routed SEC(".maps");

// [0]: nonzero while the registry lists damaged instances, whose lost
// translations might hold any port: a local TCP destination without an
// entry is then refused, as the supervisor refuses it.
// [1]: the round-robin counter of connects, shared by every destination as
// one supervisor's is.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} state SEC(".maps");

static __always_inline __u8 protocol_of(struct bpf_sock_addr *ctx)
{
	if (ctx->type == SOCK_STREAM)
		return IPPROTO_TCP;
	if (is_udp(ctx))
		return IPPROTO_UDP;
	return 0;
}

static __always_inline int is_routed(void)
{
	__u64 instance = bpf_get_current_ancestor_cgroup_id(aid_level + 1);

	return bpf_map_lookup_elem(&routed, &instance) != NULL;
}

static __always_inline int is_unspecified(const struct addr *a)
{
	if (is_v4(a))
		return a->addr[3] == 0;
	return (a->addr[0] | a->addr[1] | a->addr[2] | a->addr[3]) == 0;
}

// The entry of (aid, a, port): the address's own, else its family's; the
// AID's own entries, else those of AIDs without any.
static __always_inline void *lookup(void *map, __u64 aid, const struct addr *a,
				    __u32 port, __u8 protocol)
{
	struct class_key key = {};
	void *found;

	key.port = port;
	key.protocol = protocol;
	for (int i = 0; i < 2; i++) {
		key.aid = i == 0 ? aid : 0;
		key.class = CLASS_EXACT;
		key.addr[0] = a->addr[0];
		key.addr[1] = a->addr[1];
		key.addr[2] = a->addr[2];
		key.addr[3] = a->addr[3];
		found = bpf_map_lookup_elem(map, &key);
		if (found)
			return found;
		key.class = is_v4(a) ? CLASS_OTHER4 : CLASS_OTHER6;
		key.addr[0] = 0;
		key.addr[1] = 0;
		key.addr[2] = 0;
		key.addr[3] = 0;
		found = bpf_map_lookup_elem(map, &key);
		if (found || aid == 0)
			return found;
	}
	return NULL;
}

static __always_inline int refuse(void)
{
	bpf_set_retval(-ECONNREFUSED);
	return 0;
}

static __always_inline int connect_to(struct bpf_sock_addr *ctx, struct addr *dest)
{
	__u8 protocol = protocol_of(ctx);
	__u32 zero = 0, one = 1;
	struct conn_route *route;
	__u32 *damaged, *next;
	__u32 i;

	if (!protocol || !is_routed())
		return 1;
	if (!is_unspecified(dest) && !is_local(dest))
		return 1;
	route = lookup(&connects, bpf_get_current_ancestor_cgroup_id(aid_level), dest,
		       bpf_ntohs(ctx->user_port), protocol);
	if (!route) {
		damaged = bpf_map_lookup_elem(&state, &zero);
		if (damaged && *damaged && protocol == IPPROTO_TCP)
			return refuse();
		return 1;
	}
	if (route->action == REFUSE) {
		// A UDP socket stays connected to the virtual port, where its
		// datagrams are refused as a closed port's (udproutes.rs):
		// connect itself does not fail for a closed UDP port.
		if (protocol == IPPROTO_TCP)
			return refuse();
		return 1;
	}
	if (route->action != TO || route->count == 0)
		return 1;
	next = bpf_map_lookup_elem(&state, &one);
	if (!next)
		return 1;
	i = __sync_fetch_and_add(next, 1) % route->count;
	if (i >= GROUP_MAX)
		return 1;
	ctx->user_port = bpf_htons(route->ports[i]);
	return 1;
}

static __always_inline void rename(struct bpf_sock_addr *ctx, struct addr *a)
{
	__u8 protocol = protocol_of(ctx);
	__u32 *virtual;

	if (!protocol || !is_routed())
		return;
	virtual = lookup(&names, 0, a, bpf_ntohs(ctx->user_port), protocol);
	if (virtual)
		ctx->user_port = bpf_htons(*virtual);
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	struct addr dest;

	from_ip4(&dest, ctx->user_ip4);
	return connect_to(ctx, &dest);
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	struct addr dest;

	from_ip6(&dest, ctx);
	return connect_to(ctx, &dest);
}

SEC("cgroup/getsockname4")
int getsockname4(struct bpf_sock_addr *ctx)
{
	struct addr local;

	from_ip4(&local, ctx->user_ip4);
	rename(ctx, &local);
	return 1;
}

SEC("cgroup/getsockname6")
int getsockname6(struct bpf_sock_addr *ctx)
{
	struct addr local;

	from_ip6(&local, ctx);
	rename(ctx, &local);
	return 1;
}

// A peer is renamed only on this host, as the supervisor renames it.
SEC("cgroup/getpeername4")
int getpeername4(struct bpf_sock_addr *ctx)
{
	struct addr peer;

	from_ip4(&peer, ctx->user_ip4);
	if (is_local(&peer))
		rename(ctx, &peer);
	return 1;
}

SEC("cgroup/getpeername6")
int getpeername6(struct bpf_sock_addr *ctx)
{
	struct addr peer;

	from_ip6(&peer, ctx);
	if (is_local(&peer))
		rename(ctx, &peer);
	return 1;
}

char LICENSE[] SEC("license") = "Apache-2.0";
