// SPDX-License-Identifier: GPL-2.0
/* adpop XDP filter: drops blocked sources, sources over their rate, TCP/UDP to ports not on
 * the allowlist, malformed or truncated headers and (when configured) IP fragments, each
 * under its own per-CPU counter; everything else passes, ARP and IPv6 neighbour discovery
 * always. Maps and layouts: filter.h. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "filter.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct adpop_lpm4);
	__type(value, __u8);
	__uint(max_entries, ADPOP_BLOCK_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} adpop_block4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct adpop_lpm6);
	__type(value, __u8);
	__uint(max_entries, ADPOP_BLOCK_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} adpop_block6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct adpop_source);
	__type(value, struct adpop_bucket);
	__uint(max_entries, ADPOP_RATE_MAX);
} adpop_rate SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u8);
	__uint(max_entries, 65536);
} adpop_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct adpop_config);
	__uint(max_entries, 1);
} adpop_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct adpop_counter_value);
	__uint(max_entries, ADPOP_C_COUNT);
} adpop_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct adpop_source);
	__type(value, __u64);
	__uint(max_entries, ADPOP_TOP_MAX);
} adpop_top SEC(".maps");

_Static_assert(sizeof(struct adpop_lpm4) == ADPOP_LPM4_SIZE, "lpm4 layout");
_Static_assert(sizeof(struct adpop_lpm6) == ADPOP_LPM6_SIZE, "lpm6 layout");
_Static_assert(sizeof(struct adpop_source) == ADPOP_SOURCE_SIZE, "source layout");
_Static_assert(sizeof(struct adpop_bucket) == ADPOP_BUCKET_SIZE, "bucket layout");
_Static_assert(sizeof(struct adpop_config) == ADPOP_CONFIG_SIZE, "config layout");
_Static_assert(sizeof(struct adpop_counter_value) == ADPOP_COUNTER_SIZE, "counter layout");

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

struct frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 id;
};

struct opt_hdr {
	__u8 nexthdr;
	__u8 hdrlen;
};

#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF
#define ND_FIRST 133 /* router solicitation */
#define ND_LAST 137  /* redirect */

static __always_inline int verdict(struct xdp_md *ctx, __u32 reason, struct adpop_source *src)
{
	struct adpop_counter_value *counter = bpf_map_lookup_elem(&adpop_counters, &reason);
	if (counter) {
		counter->packets++;
		counter->bytes += ctx->data_end - ctx->data;
	}
	if (reason == ADPOP_C_PASS)
		return XDP_PASS;
	if (src) {
		__u64 *drops = bpf_map_lookup_elem(&adpop_top, src);
		if (drops) {
			__sync_fetch_and_add(drops, 1);
		} else {
			__u64 one = 1;
			bpf_map_update_elem(&adpop_top, src, &one, BPF_NOEXIST);
		}
	}
	return XDP_DROP;
}

/* Token bucket per source: credit grows one nanosecond per nanosecond up to burst_ns; a
 * packet spends cost_ns of it. Races between CPUs can let a packet or two more through. */
static __always_inline int over_rate(struct adpop_config *cfg, struct adpop_source *src)
{
	if (!cfg || !cfg->cost_ns)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	struct adpop_bucket *bucket = bpf_map_lookup_elem(&adpop_rate, src);
	if (!bucket) {
		struct adpop_bucket fresh = {.credit_ns = cfg->burst_ns - cfg->cost_ns, .last_ns = now};
		bpf_map_update_elem(&adpop_rate, src, &fresh, BPF_ANY);
		return 0;
	}
	__u64 credit = bucket->credit_ns + (now - bucket->last_ns);
	if (credit > cfg->burst_ns)
		credit = cfg->burst_ns;
	bucket->last_ns = now;
	if (credit < cfg->cost_ns) {
		bucket->credit_ns = credit;
		return 1;
	}
	bucket->credit_ns = credit - cfg->cost_ns;
	return 0;
}

static __always_inline int transport(struct xdp_md *ctx, __u8 proto, void *l4, void *end,
				     struct adpop_config *cfg, struct adpop_source *src)
{
	__be16 port;
	__u8 bit;
	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > end || tcp->doff < 5)
			return verdict(ctx, ADPOP_C_MALFORMED, src);
		port = tcp->dest;
		bit = ADPOP_PORT_TCP;
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > end)
			return verdict(ctx, ADPOP_C_MALFORMED, src);
		port = udp->dest;
		bit = ADPOP_PORT_UDP;
	} else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		if (l4 + 4 > end) /* type, code, checksum */
			return verdict(ctx, ADPOP_C_MALFORMED, src);
		return verdict(ctx, ADPOP_C_PASS, src);
	} else {
		return verdict(ctx, ADPOP_C_PASS, src);
	}
	if (cfg && (cfg->flags & ADPOP_F_ENFORCE_PORTS)) {
		__u32 key = bpf_ntohs(port);
		__u8 *allowed = bpf_map_lookup_elem(&adpop_ports, &key);
		if (!allowed || !(*allowed & bit))
			return verdict(ctx, ADPOP_C_PORT, src);
	}
	return verdict(ctx, ADPOP_C_PASS, src);
}

static __always_inline int ipv4(struct xdp_md *ctx, void *cursor, void *end,
				struct adpop_config *cfg)
{
	struct iphdr *ip = cursor;
	if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl < 5)
		return verdict(ctx, ADPOP_C_MALFORMED, 0);
	__u32 header = ip->ihl * 4;
	if (cursor + header > end || bpf_ntohs(ip->tot_len) < header)
		return verdict(ctx, ADPOP_C_MALFORMED, 0);
	struct adpop_source src = {.addr = {[10] = 0xff, [11] = 0xff}};
	__builtin_memcpy(&src.addr[12], &ip->saddr, 4);
	struct adpop_lpm4 key = {.prefixlen = 32};
	__builtin_memcpy(key.addr, &ip->saddr, 4);
	if (bpf_map_lookup_elem(&adpop_block4, &key))
		return verdict(ctx, ADPOP_C_BLOCKED, &src);
	if (over_rate(cfg, &src))
		return verdict(ctx, ADPOP_C_RATE, &src);
	__u16 frag = bpf_ntohs(ip->frag_off);
	if (frag & (IP_MF | IP_OFFSET)) {
		if (cfg && (cfg->flags & ADPOP_F_DROP_FRAGMENTS))
			return verdict(ctx, ADPOP_C_FRAGMENT, &src);
		if (frag & IP_OFFSET) /* a later fragment: no transport header to look at */
			return verdict(ctx, ADPOP_C_PASS, &src);
	}
	return transport(ctx, ip->protocol, cursor + header, end, cfg, &src);
}

static __always_inline int extension(__u8 next)
{
	return next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
	       next == IPPROTO_AH || next == IPPROTO_FRAGMENT;
}

/* No header chain ends this deep into a frame; the bound keeps offsets inside the verifier's
 * packet range. */
#define HEADER_MAX 0x3fff
#define WALK_NEXT 16
#define WALK_FRAGMENT 24
#define WALK_LATER_FRAGMENT 25

/* `size` bytes at `off` into the packet, or NULL when the packet is shorter. */
static __always_inline void *at(struct xdp_md *ctx, __u32 off, __u32 size)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (off > HEADER_MAX)
		return 0;
	void *p = data + off;
	if (p + size > end)
		return 0;
	return p;
}

/* Walks the IPv6 extension headers that start at `off` with protocol `next`. Returns the
 * offset of the header after them (bits 0-15), its protocol (16-23) and whether the packet is
 * a fragment (24) and a later fragment (25); -1 when the chain is cut short or longer than we
 * walk. A global function, so the verifier checks the walk once with its arguments unknown:
 * inlined, each extension header multiplied the paths through everything after it, and the
 * VLAN tags multiplied those (320,000 instructions of verifier work at every boot, seconds
 * under emulation; 5,600 now). Only packets that carry extension headers pay for the call. */
__noinline __s64 ipv6_extensions(struct xdp_md *ctx, __u32 off, __u32 next)
{
	__s64 fragment = 0, later_fragment = 0;
	for (int i = 0; i < ADPOP_IPV6_EXT_MAX; i++) {
		if (next == IPPROTO_FRAGMENT) {
			struct frag_hdr *frag = at(ctx, off, sizeof(*frag));
			if (!frag)
				return -1;
			fragment = 1;
			later_fragment = (bpf_ntohs(frag->frag_off) & 0xFFF8) != 0;
			next = frag->nexthdr;
			off += sizeof(*frag);
		} else if (extension(next)) {
			struct opt_hdr *opt = at(ctx, off, sizeof(*opt));
			if (!opt)
				return -1;
			/* AH counts its length in 4-byte units less 2, the others in 8-byte units
			 * less 1. */
			off += next == IPPROTO_AH ? (opt->hdrlen + 2) * 4 : (opt->hdrlen + 1) * 8;
			next = opt->nexthdr;
		} else {
			break;
		}
	}
	if (extension(next) || off > HEADER_MAX) /* a longer chain than we walk */
		return -1;
	return off | (__s64)next << WALK_NEXT | fragment << WALK_FRAGMENT |
	       later_fragment << WALK_LATER_FRAGMENT;
}

static __always_inline int ipv6(struct xdp_md *ctx, void *data, void *cursor, void *end,
				struct adpop_config *cfg)
{
	struct ipv6hdr *ip6 = cursor;
	if ((void *)(ip6 + 1) > end || ip6->version != 6)
		return verdict(ctx, ADPOP_C_MALFORMED, 0);
	__u8 next = ip6->nexthdr;
	void *p = ip6 + 1;
	int fragment = 0, later_fragment = 0;
	if (extension(next)) {
		__s64 walked = ipv6_extensions(ctx, p - data, next);
		if (walked < 0)
			return verdict(ctx, ADPOP_C_MALFORMED, 0);
		/* The mask restates the walk's bound for the verifier, which does not see into it. */
		p = data + (walked & HEADER_MAX);
		next = walked >> WALK_NEXT;
		fragment = (walked >> WALK_FRAGMENT) & 1;
		later_fragment = (walked >> WALK_LATER_FRAGMENT) & 1;
	}
	struct adpop_source src;
	__builtin_memcpy(src.addr, &ip6->saddr, 16);
	if (next == IPPROTO_ICMPV6 && !later_fragment) {
		__u8 *type = p;
		if ((void *)(type + 4) > end)
			return verdict(ctx, ADPOP_C_MALFORMED, &src);
		if (*type >= ND_FIRST && *type <= ND_LAST) /* neighbour discovery always passes */
			return verdict(ctx, ADPOP_C_PASS, &src);
	}
	struct adpop_lpm6 key = {.prefixlen = 128};
	__builtin_memcpy(key.addr, &ip6->saddr, 16);
	if (bpf_map_lookup_elem(&adpop_block6, &key))
		return verdict(ctx, ADPOP_C_BLOCKED, &src);
	if (over_rate(cfg, &src))
		return verdict(ctx, ADPOP_C_RATE, &src);
	if (fragment) {
		if (cfg && (cfg->flags & ADPOP_F_DROP_FRAGMENTS))
			return verdict(ctx, ADPOP_C_FRAGMENT, &src);
		if (later_fragment)
			return verdict(ctx, ADPOP_C_PASS, &src);
	}
	return transport(ctx, next, p, end, cfg, &src);
}

SEC("xdp")
int adpop_filter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return verdict(ctx, ADPOP_C_MALFORMED, 0);
	__be16 proto = eth->h_proto;
	void *cursor = eth + 1;
#pragma unroll
	for (int i = 0; i < 2; i++) { /* VLAN, and QinQ's outer tag */
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		struct vlan_hdr *vlan = cursor;
		if ((void *)(vlan + 1) > end)
			return verdict(ctx, ADPOP_C_MALFORMED, 0);
		proto = vlan->proto;
		cursor = vlan + 1;
	}
	__u32 zero = 0;
	struct adpop_config *cfg = bpf_map_lookup_elem(&adpop_config, &zero);
	if (proto == bpf_htons(ETH_P_IP))
		return ipv4(ctx, cursor, end, cfg);
	if (proto == bpf_htons(ETH_P_IPV6))
		return ipv6(ctx, data, cursor, end, cfg);
	return verdict(ctx, ADPOP_C_PASS, 0); /* ARP and every other ethertype */
}

char LICENSE[] SEC("license") = "GPL";
