// The engine's lifetime: its admin socket and shards started, waited for and stopped.
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <ctime>

#include "clock.hpp"
#include "server.hpp"

namespace adpop {

Engine::Engine(EngineOptions options)
    : options_(std::move(options)),
      signer_(options_.token_key),
      dedup_(),
      pacing_(options_.shards, options_.pacing_campaigns) {}

Engine::~Engine() {
  stopping_.store(true);
  for (auto& s : shards_) s->join();
  if (admin_thread_.joinable()) admin_thread_.join();
  if (admin_fd_ >= 0) ::close(admin_fd_);
  if (!options_.admin_path.empty()) ::unlink(options_.admin_path.c_str());
  delete current_.load();
}

std::int64_t Engine::now_seconds() const {
  return static_cast<std::int64_t>(std::time(nullptr));
}

bool Engine::start(std::string* error) {
  started_ns_ = mono_ns();
  rate_ns_ = started_ns_;
  if (!load(error)) return false;
  if (!options_.spool_dir.empty()) {
    // Segments a crashed run left open are closed before any shard opens its own: from here
    // they count in the backlog and ship like any other.
    leftovers_closed_ = close_leftovers(options_.spool_dir, &leftover_bytes_);
    if (leftovers_closed_)
      std::fprintf(stderr, "adpop-engine: closed %u spool segment(s) (%llu bytes) an earlier run left open\n",
                   leftovers_closed_, static_cast<unsigned long long>(leftover_bytes_));
    spool_backlog_.store(adpop::spool_backlog(options_.spool_dir));
  }
  if (!options_.admin_path.empty()) {
    ::unlink(options_.admin_path.c_str());
    admin_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (options_.admin_path.size() >= sizeof addr.sun_path) {
      *error = "--admin: path too long for a Unix socket";
      return false;
    }
    std::strcpy(addr.sun_path, options_.admin_path.c_str());
    if (bind(admin_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(admin_fd_, 64) != 0) {
      *error = "admin socket " + options_.admin_path + ": " + std::strerror(errno);
      return false;
    }
    chmod(options_.admin_path.c_str(), 0660);
  }
  const int ncpu = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  for (std::uint32_t i = 0; i < options_.shards; ++i) {
    int cpu = options_.cpus.empty() ? -1 : options_.cpus[i % options_.cpus.size()];
    if (cpu >= ncpu) {
      *error = "--cpus: CPU " + std::to_string(cpu) + " does not exist (this machine has " +
               std::to_string(ncpu) + ")";
      return false;
    }
    shards_.push_back(std::make_unique<Shard>(*this, i, cpu));
    if (!shards_.back()->start(error)) return false;
  }
  admin_thread_ = std::thread([this] { admin_loop(); });
  return true;
}

void Engine::watch_spool() {
  if (options_.spool_dir.empty()) return;
  const std::int64_t now = mono_ns();
  if (now - spool_checked_ns_ < 100'000'000) return;
  spool_checked_ns_ = now;
  const std::uint64_t backlog = adpop::spool_backlog(options_.spool_dir);
  spool_backlog_.store(backlog, std::memory_order_relaxed);
  // Shedding is logged when it starts and when it ends, not per request.
  const Totals totals = collect();
  const bool shedding = totals.counts[kSpoolShedding] > 0;
  if (shedding != spool_shedding_)
    std::fprintf(stderr,
                 shedding
                     ? "adpop-engine: spool full (%llu bytes waiting): answering no-fill (spool_full) until "
                       "shipping makes room\n"
                     : "adpop-engine: spool has room again (%llu bytes waiting): serving ads\n",
                 static_cast<unsigned long long>(backlog));
  spool_shedding_ = shedding;
}

void Engine::wait() {
  for (auto& s : shards_) s->join();
  if (admin_thread_.joinable()) admin_thread_.join();
}

}  // namespace adpop
