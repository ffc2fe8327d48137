// adpop-engine: the serving process. See --help; bad flags exit 2 with one line.
#include <arpa/inet.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <iterator>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "server.hpp"

namespace {

constexpr const char* kUsage = R"(usage: adpop-engine --snapshot DIR [options]

Serves ad decisions over HTTP/1.1 from the campaign snapshot in DIR (DIR/payload.capnp;
normally the store's `current` link). One shard per CPU: a pinned thread with its own
SO_REUSEPORT listener and epoll loop.

  --listen ADDR[,ADDR...]  serving addresses, HOST:PORT or [IPV6]:PORT; repeat or list
                           several; [::]:PORT takes IPv4 too (default 127.0.0.1:8080)
  --metrics-listen ADDR    the only address serving /metrics (and /healthz); keep it on
                           loopback or a management network (default: none)
  --admin PATH             admin Unix socket: GET /status, POST /load /drain /undrain /decide
  --snapshot DIR           snapshot folder (required); SIGHUP or POST /load re-reads it
  --shards N               serving threads (default 1)
  --cpus LIST              CPUs to pin shards to, e.g. 2,3 or 2-5 (default: unpinned)
  --idle-poll-us N         after its last event a shard polls this long before it sleeps:
                           a client's packet then finds it awake, with no wakeup to pay
                           on either side; costs that CPU while idle (default 0: sleep).
                           Only a busy shard polls: one that waited for over a quarter
                           of the last 100 ms sleeps at once (adpop_shards_polling)
  --hugepages              back the snapshot with huge pages when the host has them
  --max-connections N      open client connections, whole process (default 10000)
  --idle-timeout MS        close keep-alive connections idle this long (default 30000)
  --request-timeout MS     answer 408 if a request takes longer to arrive (default 10000)
  --first-byte-timeout MS  close a new connection that sends nothing this long (default 2000);
                           at the connection cap, idle ones are closed oldest first
  --max-header-bytes N     request line + headers limit, else 431 (default 8192)
  --max-body-bytes N       body limit, else 413 (default 65536)
  --spool DIR              per-shard event spool segments (see engine/SPOOL.md), created
                           when missing (its parent must exist); without it events are
                           counted as dropped
  --spool-segment-bytes N  rotate a segment at this size (default 67108864)
  --spool-segment-age S    rotate a segment at this age in seconds (default 60)
  --spool-max-bytes N      bound on the spool folder's bytes; past it decisions answer
                           no-fill (spool_full) and pixels 503 (default 0: the disk bounds it)
  --spool-headroom-bytes N per shard, kept for pixels of ads already served (default 262144)
  --token-key FILE         secret (>= 16 bytes) signing impression and click URLs, created
                           with 32 random bytes (mode 0600) when missing; without the flag
                           answers carry no tracking URLs and tracking requests get 403
  --token-ttl S            tracking URLs stay valid this long (default 86400)
  --dedup-window S         an impression of one request and ad counts once within (default 3600)
  --pacing-campaigns N     campaigns with a budget allowance in one day (default 16384)
  --cache HOST:PORT        the PoP cache (Redis protocol) that keeps spend and the dedup
                           window across engine restarts (engine/CACHE.md); none by default
  --cache-password-file F  the password the cache requires (AUTH), read once at start
  --cache-timeout-ms N     a cache command unanswered this long drops the link (default 250)
  --restore-wait-ms N      at start, budgeted campaigns wait this long for the cache (2000)
  --cache-wait-us N        a request with a user key and no cap token waits at most this
                           for the user's counters from the cache (default 2000)
  --help                   this text
)";

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "adpop-engine: %s (see --help)\n", message.c_str());
  std::exit(2);
}

// A PoP's first start has no key yet: 32 random bytes, readable by this user only. O_EXCL, so
// a key another start made first is kept (every token signed with it stays valid).
void make_token_key(const std::string& path) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == EEXIST) return;
    die("--token-key: cannot create " + path + ": " + std::strerror(errno) +
        "; create its parent folder first");
  }
  unsigned char key[32];
  bool written = getrandom(key, sizeof key, 0) == static_cast<ssize_t>(sizeof key) &&
                 write(fd, key, sizeof key) == static_cast<ssize_t>(sizeof key) && fsync(fd) == 0;
  close(fd);
  if (!written) {
    unlink(path.c_str());  // never leave a short key behind for the next start to refuse
    die("--token-key: cannot write " + path + ": " + std::strerror(errno));
  }
}

std::uint64_t number(std::string_view flag, std::string_view value, std::uint64_t lo, std::uint64_t hi) {
  std::uint64_t n = 0;
  auto r = std::from_chars(value.data(), value.data() + value.size(), n);
  if (r.ec != std::errc{} || r.ptr != value.data() + value.size() || n < lo || n > hi)
    die(std::string(flag) + ": expected a number from " + std::to_string(lo) + " to " + std::to_string(hi) +
        ", got '" + std::string(value) + "'");
  return n;
}

adpop::Endpoint endpoint(std::string_view flag, std::string_view value) {
  adpop::Endpoint ep;
  std::string error;
  if (!adpop::parse_endpoint(value, &ep, &error)) die(std::string(flag) + ": " + error);
  return ep;
}

std::vector<int> cpu_list(std::string_view value) {
  std::vector<int> cpus;
  while (!value.empty()) {
    std::size_t comma = value.find(',');
    std::string_view item = value.substr(0, comma);
    std::size_t dash = item.find('-');
    int a = static_cast<int>(number("--cpus", item.substr(0, dash), 0, 4095));
    int b = dash == std::string_view::npos
                ? a
                : static_cast<int>(number("--cpus", item.substr(dash + 1), 0, 4095));
    if (b < a) die("--cpus: range " + std::string(item) + " runs backwards");
    for (int c = a; c <= b; ++c) cpus.push_back(c);
    if (comma == std::string_view::npos) break;
    value.remove_prefix(comma + 1);
  }
  if (cpus.empty()) die("--cpus: empty list");
  return cpus;
}

}  // namespace

int main(int argc, char** argv) {
  adpop::EngineOptions o;
  bool shards_given = false;
  bool listen_given = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (flag == "--hugepages") {
      o.hugepages = true;
      continue;
    }
    if (i + 1 >= argc) die(std::string(flag) + ": missing value, or unknown flag");
    std::string_view value = argv[++i];
    if (flag == "--listen") {
      if (!listen_given) o.listen.clear();  // the first --listen replaces the default
      listen_given = true;
      while (true) {
        const std::size_t comma = value.find(',');
        o.listen.push_back(endpoint(flag, value.substr(0, comma)));
        if (comma == std::string_view::npos) break;
        value.remove_prefix(comma + 1);
      }
    } else if (flag == "--metrics-listen") {
      o.metrics = endpoint(flag, value);
    } else if (flag == "--admin") {
      o.admin_path = std::string(value);
    } else if (flag == "--snapshot") {
      o.snapshot_dir = std::string(value);
    } else if (flag == "--shards") {
      o.shards = static_cast<std::uint32_t>(number(flag, value, 1, 1024));
      shards_given = true;
    } else if (flag == "--cpus") {
      o.cpus = cpu_list(value);
    } else if (flag == "--max-connections") {
      o.max_connections = static_cast<std::uint32_t>(number(flag, value, 1, 10000000));
    } else if (flag == "--idle-poll-us") {
      o.idle_poll_us = static_cast<std::uint32_t>(number(flag, value, 0, 1000000));
    } else if (flag == "--idle-timeout") {
      o.idle_timeout_ms = static_cast<std::uint32_t>(number(flag, value, 10, 86400000));
    } else if (flag == "--first-byte-timeout") {
      o.first_byte_timeout_ms = static_cast<std::uint32_t>(number(flag, value, 10, 3600000));
    } else if (flag == "--request-timeout") {
      o.request_timeout_ms = static_cast<std::uint32_t>(number(flag, value, 10, 3600000));
    } else if (flag == "--max-header-bytes") {
      o.http.max_header_bytes = number(flag, value, 256, 1 << 20);
    } else if (flag == "--max-body-bytes") {
      o.http.max_body_bytes = number(flag, value, 0, 64 << 20);
    } else if (flag == "--spool") {
      o.spool_dir = std::string(value);
      // Made here, not by a wrapper, so the unit can exec the engine straight from systemd.
      if (mkdir(o.spool_dir.c_str(), 0770) != 0 && errno != EEXIST)
        die("--spool: cannot create " + o.spool_dir + ": " + std::strerror(errno) +
            "; create its parent folder first");
      struct stat st {};
      if (stat(o.spool_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) ||
          access(o.spool_dir.c_str(), W_OK) != 0)
        die("--spool: " + o.spool_dir + " is not a writable folder; fix its owner or mode");
    } else if (flag == "--spool-segment-bytes") {
      o.spool_segment_bytes = number(flag, value, 4096, 1ull << 34);
    } else if (flag == "--spool-max-bytes") {
      o.spool_max_bytes = number(flag, value, 0, 1ull << 50);
    } else if (flag == "--spool-headroom-bytes") {
      o.spool_headroom_bytes = number(flag, value, 4096, 1ull << 34);
    } else if (flag == "--spool-segment-age") {
      o.spool_segment_age_s = static_cast<std::uint32_t>(number(flag, value, 1, 86400));
    } else if (flag == "--token-key") {
      make_token_key(std::string(value));
      std::ifstream in{std::string(value), std::ios::binary};
      if (!in) die("--token-key: cannot read " + std::string(value));
      o.token_key.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
      if (o.token_key.size() < 16)
        die("--token-key: " + std::string(value) +
            " holds fewer than 16 bytes; use e.g. `head -c 32 /dev/urandom`");
    } else if (flag == "--token-ttl") {
      o.token_ttl_s = static_cast<std::uint32_t>(number(flag, value, 1, 30 * 86400));
    } else if (flag == "--cache") {
      o.cache = endpoint(flag, value);
      std::string host = o.cache.host;
      if (!host.empty() && host.front() == '[') host = host.substr(1, host.size() - 2);
      in6_addr probe;
      if (inet_pton(AF_INET, host.c_str(), &probe) != 1 && inet_pton(AF_INET6, host.c_str(), &probe) != 1)
        die("--cache: expected an IP address and port, got '" + std::string(value) + "'");
    } else if (flag == "--cache-password-file") {
      std::ifstream in{std::string(value)};
      if (!in) die("--cache-password-file: cannot read " + std::string(value));
      std::getline(in, o.cache_password);
      if (o.cache_password.empty()) die("--cache-password-file: " + std::string(value) + " is empty");
    } else if (flag == "--cache-timeout-ms") {
      o.cache_timeout_ms = static_cast<std::uint32_t>(number(flag, value, 1, 60000));
    } else if (flag == "--cache-wait-us") {
      o.cache_wait_us = static_cast<std::uint32_t>(number(flag, value, 0, 1'000'000));
    } else if (flag == "--restore-wait-ms") {
      o.restore_wait_ms = static_cast<std::uint32_t>(number(flag, value, 0, 60000));
    } else if (flag == "--pacing-campaigns") {
      o.pacing_campaigns = static_cast<std::uint32_t>(number(flag, value, 1, 1 << 20));
    } else if (flag == "--dedup-window") {
      o.dedup_window_s = static_cast<std::uint32_t>(number(flag, value, 1, 7 * 86400));
    } else {
      die("unknown flag " + std::string(flag));
    }
  }
  if (o.snapshot_dir.empty()) die("--snapshot DIR is required");
  if (!o.cpus.empty() && !shards_given) o.shards = static_cast<std::uint32_t>(o.cpus.size());
  if (!o.cpus.empty() && o.cpus.size() != o.shards)
    die("--cpus lists " + std::to_string(o.cpus.size()) + " CPUs for " + std::to_string(o.shards) +
        " shards; give one per shard");

  // Signals are taken synchronously by this thread; every other thread inherits the mask.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGHUP);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);

  adpop::Engine engine(o);
  std::string error;
  if (!engine.start(&error)) {
    std::fprintf(stderr, "adpop-engine: %s\n", error.c_str());
    return 1;
  }
  std::string addresses;
  for (const adpop::Endpoint& ep : o.listen) addresses += (addresses.empty() ? "" : ", ") + ep.text();
  std::fprintf(stderr, "adpop-engine: serving %s with %u shard(s); metrics %s\n", addresses.c_str(), o.shards,
               o.metrics.port ? ("on " + o.metrics.text()).c_str() : "off");
  while (true) {
    int sig = 0;
    if (sigwait(&set, &sig) != 0) continue;
    if (sig == SIGHUP) {
      engine.request_reload();
      continue;
    }
    break;
  }
  engine.stop();
  engine.wait();
  return 0;
}
