// The proxy's sockmap path (proxy/src/sockmap.rs): an sk_skb stream-verdict program that sends
// each pass-through socket's bytes straight to its peer inside the kernel.
//
// Self-contained on purpose (no kernel or libbpf headers): it builds with nothing but
// `clang -target bpf`, the same on every architecture. Built by proxy/build.rs.

typedef unsigned int __u32;
typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name

// Only the first field is read; the verifier checks the offset, not this declaration.
struct __sk_buff {
	__u32 len;
};

enum { BPF_MAP_TYPE_HASH = 1, BPF_MAP_TYPE_ARRAY = 2, BPF_MAP_TYPE_SOCKHASH = 18 };
enum { BPF_F_NO_PREALLOC = 1 };
enum { SK_DROP = 0, SK_PASS = 1 };

// Helpers by number (include/uapi/linux/bpf.h); stable kernel ABI.
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static __u64 (*bpf_get_socket_cookie)(void *ctx) = (void *)46;
static long (*bpf_sk_redirect_hash)(struct __sk_buff *skb, void *map, void *key, __u64 flags) = (void *)72;

// A socket's cookie → its PEER socket: where the verdict sends what the socket receives. No
// program is attached to this map, so entering a pair here runs nothing yet.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 2);
	__type(key, __u64);
	__type(value, __u32);
} MIG_PEERS SEC(".maps");

// A socket's cookie → the socket itself. The verdict program is attached to this map: a socket
// entered here has its bytes redirected from then on. Userspace enters a pair here only after
// both are in MIG_PEERS, so no byte ever meets a missing peer. max_entries of the socket maps
// and MIG_META are set at load time (2 × max_connections).
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 2);
	__type(key, __u64);
	__type(value, __u32);
} MIG_SOCKS SEC(".maps");

// A socket's cookie → [bytes received and sent on to the peer, index into MIG_PORT_BYTES].
// Userspace reads the bytes for the idle timeout and half-close and removes the entry at close.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, __u64[2]);
} MIG_META SEC(".maps");

// Bytes per pass-through port and direction: index listener * 2 + (0 in, 1 out), for mon.
// max_entries set at load time.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} MIG_PORT_BYTES SEC(".maps");

SEC("sk_skb/stream_verdict")
int mig_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	__u64 *meta = bpf_map_lookup_elem(&MIG_META, &cookie);
	if (meta) {
		__u32 len = skb->len;
		__sync_fetch_and_add(&meta[0], len);
		__u32 index = (__u32)meta[1];
		__u64 *port = bpf_map_lookup_elem(&MIG_PORT_BYTES, &index);
		if (port)
			__sync_fetch_and_add(port, len);
	}
	return bpf_sk_redirect_hash(skb, &MIG_PEERS, &cookie, 0);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
