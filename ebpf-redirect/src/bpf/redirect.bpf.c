// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// meshgate eBPF redirect and L3/L4 fallback enforcement.
//
// Built by ebpf-redirect/build.rs with `clang -O2 -g -target bpf`, loaded by the aya loader in
// ../lib.rs. Only UAPI context structs are used (no vmlinux.h, no CO-RE, no kernel BTF needed).
//
// Attached to the workload's (app's) cgroup v2:
//   cgroup/connect4, cgroup/connect6   outbound decision per connect(): exempt / redirect / allow / deny
//   cgroup/sendmsg4, cgroup/sendmsg6   the same decision for unconnected UDP (sendto): allow / deny
//   sockops                            re-keys the original destination from socket cookie to 4-tuple,
//                                      and puts the pod's local hops into `local_socks`
//                                      (mg_sockops_accel; mg_sockops without the latter, for
//                                      kernels older than 5.15)
//   cgroup_skb/ingress                 drops packets to the app's ports unless they come over loopback
// Attached to the sidecar's cgroup (the same cgroup when the sidecar is exempt by uid):
//   cgroup/getsockopt                  answers getsockopt(SOL_IP, SO_ORIGINAL_DST) like netfilter
//   sockops                            the same program, so the sidecar's ends of the local hops
//                                      are in `local_socks` too (when it has its own cgroup)
// Attached to the map `local_socks`:
//   sk_msg                             local acceleration: what one end of a local hop (app <->
//                                      its sidecar over loopback) sends goes straight into the
//                                      other end's receive queue, without the TCP/IP stack
//
// Byte orders (the kernel mixes them): bpf_sock_addr.user_ip4/user_port network order;
// bpf_sock.src_port host order, bpf_sock.dst_port network order; bpf_sock_ops.local_port host
// order, remote_port network order shifted into the upper half (bpf_ntohl gives host order).

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SO_ORIGINAL_DST 80
#define SOL_IP 0

// config.flags
#define F_LOOPBACK_EXEMPT 1u // connects to 127.0.0.0/8 and ::1 go direct
#define F_ENFORCE_EGRESS 2u  // non-mesh destinations must be allowlisted (else EPERM)
#define F_ENFORCE_INGRESS 4u // app ports accept only loopback (the local sidecar)
#define F_ACCEL_LOCAL 8u     // local hops (app <-> sidecar over loopback) skip the TCP/IP stack

// policy kinds (first byte of the LPM key)
#define K_EXEMPT 1
#define K_MESH 2
#define K_ALLOW 3

// counters (index into the `counters` array; mirrored in lib.rs)
#define C_REDIRECTED 0
#define C_ALLOWED 1
#define C_EXEMPT 2
#define C_SIDECAR 3
#define C_DENIED_EGRESS 4
#define C_DENIED_INGRESS 5
#define C_DENIED_IPV6 6
#define C_DENIED_UDP_MESH 7
#define C_ORIGDST_HIT 8
#define C_ORIGDST_MISS 9
#define C_ACCEL_SOCKETS 10  // sockets of local hops put into local_socks
#define C_ACCEL_REFUSED 11  // ... that could not be (map full, or in another attachment's): they stay on TCP
#define C_ACCEL_MSGS 12     // messages passed socket to socket
#define C_ACCEL_FALLBACK 13 // local hops whose peer was not in local_socks: the whole connection stays on TCP
#define C_MAX 16

// verdicts for per-port counters
#define V_REDIRECTED 0
#define V_ALLOWED 1
#define V_EXEMPT 2
#define V_DENIED_EGRESS 3
#define V_DENIED_INGRESS 4
#define V_DENIED_IPV6 5
#define V_DENIED_UDP_MESH 6

struct config {
	__u64 cgroup_id;         // the cgroup this instance is attached to (identity check)
	__u64 sidecar_cgroup_id; // sockets of this cgroup are never redirected (0 = none)
	__u16 outbound_port;     // host order
	__u16 inbound_port;      // host order (informational)
	__u32 flags;
	__u32 sidecar_uid;       // sockets of tasks with this uid are never redirected (u32 max = off)
	__u32 pad;
};

struct policy_key {
	__u32 prefixlen; // 32 + address bits; an IPv4 CIDR is stored as ::ffff:a.b.c.d/(96+n)
	__u8 kind;
	__u8 pad;
	__be16 port; // 0 = any port
	__u8 addr[16];
};

struct orig_dst {
	__be32 ip;
	__be16 port;
	__u16 pad;
};

struct tuple4 {
	__be32 sip; // the app socket's local address
	__be32 dip; // the app socket's remote address (the sidecar's outbound listener)
	__u16 sport; // host order
	__u16 dport; // host order
};

// A local hop's socket, as seen from that socket: its own address and port, then the peer's.
// IPv4 (an IPv4-mapped IPv6 socket is keyed by its IPv4 addresses). The network namespace is part
// of the key: 127.0.0.1:<port> pairs repeat in every pod.
struct local_key {
	__u64 netns;
	__be32 lip;
	__be32 rip;
	__u32 lport; // host order
	__u32 rport; // host order
};

struct port_key {
	__u16 port; // host order
	__u8 verdict;
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_key);
	__type(value, __u32);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u16); // host order
	__type(value, __u8);
} app_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, C_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct port_key);
	__type(value, __u64);
} port_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct orig_dst);
} orig_by_cookie SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tuple4);
	__type(value, struct orig_dst);
} orig_by_tuple SEC(".maps");

// The local hops' sockets. The kernel removes a socket when it closes.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct local_key);
	__type(value, __u64);
} local_socks SEC(".maps");

// Sockets of local hops that stay on TCP: a message found no peer in local_socks (its socket
// was not there yet, or is not in this pod's cgroups). Once one byte went over TCP, every later
// one must too, or the receiver could read them out of order. Socket-local storage: the flag
// lives and dies with its socket (never evicted, never seen by a later connection).
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u8);
} local_tcp SEC(".maps");

// Free-form metadata written by the loader (cgroup paths), never read by the programs.
struct meta {
	char cgroup[256];
	char sidecar_cgroup[256];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct meta);
} meta SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline void count_port(__u16 port, __u8 verdict)
{
	struct port_key k = {.port = port, .verdict = verdict};
	__u64 *v = bpf_map_lookup_elem(&port_counters, &k);
	if (v) {
		__sync_fetch_and_add(v, 1);
		return;
	}
	__u64 one = 1;
	if (bpf_map_update_elem(&port_counters, &k, &one, BPF_NOEXIST) != 0) {
		v = bpf_map_lookup_elem(&port_counters, &k);
		if (v)
			__sync_fetch_and_add(v, 1);
	}
}

static __always_inline struct config *get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&config, &zero);
}

// Longest-prefix lookup of (kind, port) then (kind, any port).
static __always_inline int policy_has(__u8 kind, const __u8 addr[16], __be16 port)
{
	struct policy_key k = {.prefixlen = 32 + 128, .kind = kind, .port = port};
	__builtin_memcpy(k.addr, addr, 16);
	if (bpf_map_lookup_elem(&policy, &k))
		return 1;
	k.port = 0;
	return bpf_map_lookup_elem(&policy, &k) != 0;
}

static __always_inline void v4_mapped(__u8 out[16], __be32 ip)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &ip, 4);
}

static __always_inline int is_loopback4(__be32 ip)
{
	return (bpf_ntohl(ip) >> 24) == 127;
}

static __always_inline int is_v4_mapped(const __u32 w[4])
{
	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int is_loopback6(const __u32 w[4])
{
	if (w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(1))
		return 1;
	return is_v4_mapped(w) && is_loopback4(w[3]);
}

// The sidecar's own sockets: by cgroup (sidecar in its own cgroup) or by uid (Istio's 1337
// convention, for a sidecar sharing the app's cgroup, e.g. a Kubernetes pod cgroup). The uid is the
// calling task's (connect/sendmsg run in the context of the task making the call).
static __always_inline int is_sidecar(struct config *c)
{
	if (c->sidecar_uid != 0xffffffffu && (__u32)bpf_get_current_uid_gid() == c->sidecar_uid)
		return 1;
	return c->sidecar_cgroup_id != 0 && bpf_get_current_cgroup_id() == c->sidecar_cgroup_id;
}

enum decision { D_PASS, D_REDIRECT, D_DENY };

// The outbound decision shared by every hook. `addr` is the IPv6 (or v4-mapped) destination.
// Returns the decision; counts it.
static __always_inline enum decision decide(struct config *c, const __u8 addr[16], __be16 port,
					    int loopback, int stream, int native_v6)
{
	__u16 hport = bpf_ntohs(port);
	if (is_sidecar(c)) {
		count(C_SIDECAR);
		return D_PASS;
	}
	if ((loopback && (c->flags & F_LOOPBACK_EXEMPT)) || policy_has(K_EXEMPT, addr, port)) {
		count(C_EXEMPT);
		count_port(hport, V_EXEMPT);
		return D_PASS;
	}
	if (policy_has(K_MESH, addr, port)) {
		if (!stream) {
			count(C_DENIED_UDP_MESH);
			count_port(hport, V_DENIED_UDP_MESH);
			return D_DENY;
		}
		if (native_v6) {
			count(C_DENIED_IPV6);
			count_port(hport, V_DENIED_IPV6);
			return D_DENY;
		}
		return D_REDIRECT; // counted by the caller once the rewrite is done
	}
	if (!(c->flags & F_ENFORCE_EGRESS) || policy_has(K_ALLOW, addr, port)) {
		count(C_ALLOWED);
		count_port(hport, V_ALLOWED);
		return D_PASS;
	}
	count(C_DENIED_EGRESS);
	count_port(hport, V_DENIED_EGRESS);
	return D_DENY;
}

static __always_inline void record_orig(void *ctx, __be32 ip, __be16 port)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst o = {.ip = ip, .port = port};
	bpf_map_update_elem(&orig_by_cookie, &cookie, &o, BPF_ANY);
}

SEC("cgroup/connect4")
int mg_connect4(struct bpf_sock_addr *ctx)
{
	struct config *c = get_config();
	if (!c)
		return 0; // never fail open
	__be32 ip = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;
	__u8 addr[16];
	v4_mapped(addr, ip);
	int stream = ctx->type == SOCK_STREAM;
	switch (decide(c, addr, port, is_loopback4(ip), stream, 0)) {
	case D_PASS:
		return 1;
	case D_DENY:
		return 0;
	case D_REDIRECT:
		break;
	}
	record_orig(ctx, ip, port);
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(c->outbound_port);
	count(C_REDIRECTED);
	count_port(bpf_ntohs(port), V_REDIRECTED);
	return 1;
}

SEC("cgroup/connect6")
int mg_connect6(struct bpf_sock_addr *ctx)
{
	struct config *c = get_config();
	if (!c)
		return 0;
	__u32 w[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
	__be16 port = (__be16)ctx->user_port;
	int mapped = is_v4_mapped(w);
	int stream = ctx->type == SOCK_STREAM;
	switch (decide(c, (const __u8 *)w, port, is_loopback6(w), stream, !mapped)) {
	case D_PASS:
		return 1;
	case D_DENY:
		return 0;
	case D_REDIRECT:
		break;
	}
	// A v4-mapped destination on a dual-stack socket: the connection runs over IPv4, so the
	// sidecar's accepted socket is AF_INET and SO_ORIGINAL_DST works as for connect4.
	record_orig(ctx, w[3], port);
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
	ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(c->outbound_port);
	count(C_REDIRECTED);
	count_port(bpf_ntohs(port), V_REDIRECTED);
	return 1;
}

// Unconnected UDP (sendto/sendmsg with an address): never redirected, allowlist only.
SEC("cgroup/sendmsg4")
int mg_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct config *c = get_config();
	if (!c)
		return 0;
	__u8 addr[16];
	v4_mapped(addr, ctx->user_ip4);
	return decide(c, addr, (__be16)ctx->user_port, is_loopback4(ctx->user_ip4), 0, 0) == D_PASS;
}

SEC("cgroup/sendmsg6")
int mg_sendmsg6(struct bpf_sock_addr *ctx)
{
	struct config *c = get_config();
	if (!c)
		return 0;
	__u32 w[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
	return decide(c, (const __u8 *)w, (__be16)ctx->user_port, is_loopback6(w), 0,
		      !is_v4_mapped(w)) == D_PASS;
}

// The IPv4 address of a loopback socket end: an AF_INET address, or an IPv4-mapped one on an
// AF_INET6 socket (a dual-stack listener). 0 when it is not IPv4 loopback.
static __always_inline __be32 loopback_v4(__u32 family, __be32 ip4, const __u32 ip6[4])
{
	if (family == AF_INET)
		return is_loopback4(ip4) ? ip4 : 0;
	if (family == AF_INET6 && is_v4_mapped(ip6) && is_loopback4(ip6[3]))
		return ip6[3];
	return 0;
}

// A socket's local_key as seen from it, from a sock_ops or an sk_msg context (the same field
// names; a macro because each context must be read directly for the verifier).
#define LOCAL_KEY(ctx)                                                                     \
	({                                                                                 \
		__u32 l6_[4] = {ctx->local_ip6[0], ctx->local_ip6[1], ctx->local_ip6[2],   \
				ctx->local_ip6[3]};                                        \
		__u32 r6_[4] = {ctx->remote_ip6[0], ctx->remote_ip6[1], ctx->remote_ip6[2], \
				ctx->remote_ip6[3]};                                       \
		(struct local_key){                                                        \
			.netns = bpf_get_netns_cookie(ctx),                                \
			.lip = loopback_v4(ctx->family, ctx->local_ip4, l6_),              \
			.rip = loopback_v4(ctx->family, ctx->remote_ip4, r6_),             \
			.lport = ctx->local_port,                                          \
			.rport = bpf_ntohl(ctx->remote_port),                              \
		};                                                                         \
	})

// A local hop: both ends on IPv4 loopback, one of them the sidecar's outbound listener or an app
// port. Fills `k` as seen from this socket.
static __always_inline int local_hop(struct config *c, struct local_key *k)
{
	if (!k->lip || !k->rip)
		return 0;
	if (k->lport == c->outbound_port || k->rport == c->outbound_port)
		return 1;
	__u16 lport = (__u16)k->lport, rport = (__u16)k->rport;
	return bpf_map_lookup_elem(&app_ports, &lport) || bpf_map_lookup_elem(&app_ports, &rport);
}

static __always_inline void accelerate(struct bpf_sock_ops *skops)
{
	struct config *c = get_config();
	if (!c || !(c->flags & F_ACCEL_LOCAL))
		return;
	struct local_key k = LOCAL_KEY(skops);
	if (!local_hop(c, &k))
		return;
	// The loader attaches this program so that it runs once per socket.
	if (bpf_sock_hash_update(skops, &local_socks, &k, BPF_NOEXIST) == 0)
		count(C_ACCEL_SOCKETS);
	else
		count(C_ACCEL_REFUSED);
}

// When a redirected connection is established, its original destination moves from the socket
// cookie (known in connect4, before the local port exists) to the 4-tuple the sidecar can see.
static __always_inline void rekey_orig(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct orig_dst *o = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
	if (!o)
		return;
	struct orig_dst v = *o;
	struct tuple4 t = {
		.sip = skops->local_ip4,
		.dip = skops->remote_ip4,
		.sport = (__u16)skops->local_port,
		.dport = (__u16)bpf_ntohl(skops->remote_port),
	};
	bpf_map_update_elem(&orig_by_tuple, &t, &v, BPF_ANY);
	bpf_map_delete_elem(&orig_by_cookie, &cookie);
}

// The sockops program with local acceleration: every established connection of a local hop
// (either side) goes into local_socks. Needs Linux >= 5.15 (the network namespace cookie in
// sockops and sk_msg programs); the loader falls back to mg_sockops below on older kernels.
SEC("sockops")
int mg_sockops_accel(struct bpf_sock_ops *skops)
{
	if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		accelerate(skops);
		return 1;
	}
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	accelerate(skops);
	rekey_orig(skops);
	return 1;
}

// The sockops program without local acceleration (kernels older than 5.15).
SEC("sockops")
int mg_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		rekey_orig(skops);
	return 1;
}

// Local acceleration: a message sent on a socket in local_socks goes into the receive queue of
// the socket at the connection's other end (the same tuple seen from there), skipping TCP, IP,
// the loopback device and netfilter for both. No peer there: the message goes over TCP, and so
// does the rest of the connection (local_tcp). Never drops: any failure is TCP as usual. (Only
// if the kernel cannot allocate the flag's few bytes does the next message look for the peer
// again; the fallback counter still counts the connection.)
SEC("sk_msg")
int mg_local_msg(struct sk_msg_md *msg)
{
	struct local_key self = LOCAL_KEY(msg);
	// The peer's key: its local end is our remote end.
	struct local_key peer = {
		.netns = self.netns,
		.lip = self.rip,
		.rip = self.lip,
		.lport = self.rport,
		.rport = self.lport,
	};
	struct bpf_sock *sk = msg->sk;
	if (!sk)
		return SK_PASS;
	__u8 *on_tcp = bpf_sk_storage_get(&local_tcp, sk, 0, 0);
	if (on_tcp && *on_tcp)
		return SK_PASS;
	if (bpf_msg_redirect_hash(msg, &local_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
		count(C_ACCEL_MSGS);
		return SK_PASS;
	}
	on_tcp = bpf_sk_storage_get(&local_tcp, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (on_tcp)
		*on_tcp = 1;
	count(C_ACCEL_FALLBACK);
	return SK_PASS;
}

// getsockopt(fd, SOL_IP, SO_ORIGINAL_DST) on the sidecar's accepted socket: the socket's remote
// end is the app socket's local end, so the reversed tuple finds the entry sockops wrote.
SEC("cgroup/getsockopt")
int mg_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->family != AF_INET)
		return 1;
	struct tuple4 t = {
		.sip = sk->dst_ip4,
		.dip = sk->src_ip4,
		.sport = bpf_ntohs((__u16)sk->dst_port),
		.dport = (__u16)sk->src_port,
	};
	struct orig_dst *o = bpf_map_lookup_elem(&orig_by_tuple, &t);
	if (!o) {
		count(C_ORIGDST_MISS);
		return 1; // the kernel's own answer stands (ENOPROTOOPT / netfilter's)
	}
	struct sockaddr_in *sin = ctx->optval;
	if ((void *)(sin + 1) > ctx->optval_end)
		return 1;
	sin->sin_family = AF_INET;
	sin->sin_port = o->port;
	sin->sin_addr.s_addr = o->ip;
	__builtin_memset(sin->sin_zero, 0, sizeof(sin->sin_zero));
	// Volatile: clang would otherwise merge these two s32 stores into one 8-byte store, which
	// the verifier rejects (invalid bpf_context access).
	*(volatile __s32 *)&ctx->optlen = sizeof(*sin);
	*(volatile __s32 *)&ctx->retval = 0;
	count(C_ORIGDST_HIT);
	return 1;
}

static __always_inline int app_port(__u16 port)
{
	return bpf_map_lookup_elem(&app_ports, &port) != 0;
}

// Ingress on the app's sockets: its ports accept only loopback traffic (the local sidecar
// forwards to 127.0.0.1:<app port>). Anything else addressed to an app port is dropped and
// counted (per packet). Packets to other ports (replies to the app's own connections) pass.
SEC("cgroup_skb/ingress")
int mg_ingress(struct __sk_buff *skb)
{
	struct config *c = get_config();
	if (!c)
		return 0;
	if (!(c->flags & F_ENFORCE_INGRESS))
		return 1;
	__u16 dport;
	if (skb->protocol == bpf_htons(0x0800)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
			return 1;
		if (is_loopback4(ip.saddr))
			return 1;
		if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
			return 1;
		__be16 ports[2];
		if (bpf_skb_load_bytes(skb, ip.ihl * 4, ports, sizeof(ports)))
			return 1;
		dport = bpf_ntohs(ports[1]);
	} else if (skb->protocol == bpf_htons(0x86DD)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)))
			return 1;
		__u32 w[4];
		__builtin_memcpy(w, &ip6.saddr, 16);
		if (is_loopback6(w))
			return 1;
		if (ip6.nexthdr == IPPROTO_TCP || ip6.nexthdr == IPPROTO_UDP) {
			__be16 ports[2];
			if (bpf_skb_load_bytes(skb, sizeof(ip6), ports, sizeof(ports)))
				return 1;
			dport = bpf_ntohs(ports[1]);
		} else if (ip6.nexthdr == 58 /* ICMPv6 */) {
			return 1;
		} else {
			// Extension headers in front of the transport header: not parsed, so not
			// trusted. Packets to the app's sockets from outside the pod are dropped.
			count(C_DENIED_INGRESS);
			return 0;
		}
	} else {
		return 1;
	}
	if (!app_port(dport))
		return 1;
	count(C_DENIED_INGRESS);
	count_port(dport, V_DENIED_INGRESS);
	return 0;
}
