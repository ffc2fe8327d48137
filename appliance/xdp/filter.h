/* adpop XDP filter: the one description of its maps, shared by filter.bpf.c and the Python
 * controller (appliance/xdp/layout.py reads the #define lines and the enum below; each
 * layout's Python struct format sits next to its C struct, and the C side checks the sizes).
 * Keep every #define on one line: `#define NAME VALUE`. */
#ifndef ADPOP_FILTER_H
#define ADPOP_FILTER_H

#define ADPOP_MAP_BLOCK4 "adpop_block4"
#define ADPOP_MAP_BLOCK6 "adpop_block6"
#define ADPOP_MAP_RATE "adpop_rate"
#define ADPOP_MAP_PORTS "adpop_ports"
#define ADPOP_MAP_CONFIG "adpop_config"
#define ADPOP_MAP_COUNTERS "adpop_counters"
#define ADPOP_MAP_TOP "adpop_top"
#define ADPOP_PROGRAM "adpop_filter"

#define ADPOP_BLOCK_MAX 262144
#define ADPOP_RATE_MAX 65536
#define ADPOP_TOP_MAX 4096
#define ADPOP_IPV6_EXT_MAX 6

/* Port allowlist bits, per destination port. */
#define ADPOP_PORT_TCP 1
#define ADPOP_PORT_UDP 2

/* Config flags. */
#define ADPOP_F_DROP_FRAGMENTS 1
#define ADPOP_F_ENFORCE_PORTS 2

/* Counter indices (packets and bytes each, per CPU). */
enum adpop_counter {
	ADPOP_C_PASS = 0,
	ADPOP_C_BLOCKED = 1,
	ADPOP_C_RATE = 2,
	ADPOP_C_PORT = 3,
	ADPOP_C_MALFORMED = 4,
	ADPOP_C_FRAGMENT = 5,
	ADPOP_C_COUNT = 6,
};

/* LPM keys: prefix length in bits, then the address in network order. */
#define ADPOP_LPM4_FMT "<I4s"
#define ADPOP_LPM4_SIZE 8
struct adpop_lpm4 {
	__u32 prefixlen;
	__u8 addr[4];
};

#define ADPOP_LPM6_FMT "<I16s"
#define ADPOP_LPM6_SIZE 20
struct adpop_lpm6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* A source address: IPv4 as ::ffff:a.b.c.d. Keys of the rate and top maps. */
#define ADPOP_SOURCE_FMT "16s"
#define ADPOP_SOURCE_SIZE 16
struct adpop_source {
	__u8 addr[16];
};

/* Token bucket of one source, in nanoseconds of credit: a packet costs cost_ns. */
#define ADPOP_BUCKET_FMT "<QQ"
#define ADPOP_BUCKET_SIZE 16
struct adpop_bucket {
	__u64 credit_ns;
	__u64 last_ns;
};

/* The filter's settings, one entry at key 0; cost_ns 0 turns rate limiting off. */
#define ADPOP_CONFIG_FMT "<QQI4x"
#define ADPOP_CONFIG_SIZE 24
struct adpop_config {
	__u64 cost_ns;  /* 1e9 / packets per second */
	__u64 burst_ns; /* burst * cost_ns: the bucket's size */
	__u32 flags;
	__u32 pad;
};

#define ADPOP_COUNTER_FMT "<QQ"
#define ADPOP_COUNTER_SIZE 16
struct adpop_counter_value {
	__u64 packets;
	__u64 bytes;
};

#endif
