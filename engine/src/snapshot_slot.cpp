// The snapshot slot: a load maps and checks the new payload off the serving threads, swaps it
// in with one atomic exchange, and retires the old one; reclaim() frees a retired snapshot
// once every shard has published a generation past it (see Shard::run).
#include <openssl/evp.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "clock.hpp"
#include "server.hpp"

namespace adpop {

bool Engine::load(std::string* error) {
  std::lock_guard<std::mutex> lock(swap_mutex_);
  const std::int64_t started = mono_ns();
  char resolved[PATH_MAX];
  if (!realpath(options_.snapshot_dir.c_str(), resolved)) {
    ++loads_failed_;
    *error = "snapshot folder " + options_.snapshot_dir + ": " + std::strerror(errno);
    last_load_error_ = *error;
    return false;
  }
  const std::string path = std::string(resolved) + "/payload.capnp";
  auto snap = Snapshot::open(path, options_.hugepages, error);
  if (!snap) {
    ++loads_failed_;
    last_load_error_ = *error;
    return false;
  }
  // Older versions are loaded too: a rollback re-points `current` at one on purpose. The
  // sync verified every stored version (hash, signature) before it could become current.
  // The hash is recomputed here for status and reports, over the bytes actually mapped.
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_len = 0;
  {
    std::ifstream in(path, std::ios::binary);
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
    char buf[1 << 16];
    while (in.read(buf, sizeof buf) || in.gcount() > 0)
      EVP_DigestUpdate(ctx, buf, static_cast<std::size_t>(in.gcount()));
    EVP_DigestFinal_ex(ctx, digest, &digest_len);
    EVP_MD_CTX_free(ctx);
  }
  char hex[2 * EVP_MAX_MD_SIZE + 1] = {};
  for (unsigned i = 0; i < digest_len; ++i) std::snprintf(hex + 2 * i, 3, "%02x", digest[i]);
  Snapshot* next = snap.release();
  const Snapshot* old = current_.exchange(next, std::memory_order_acq_rel);
  const std::uint64_t generation = generation_.fetch_add(1, std::memory_order_acq_rel) + 1;
  if (old) retired_.emplace_back(std::unique_ptr<Snapshot>(const_cast<Snapshot*>(old)), generation);
  hash_ = hex;
  loaded_path_ = resolved;
  last_load_ms_ = static_cast<double>(mono_ns() - started) / 1e6;
  ++loads_ok_;
  last_load_error_.clear();
  return true;
}

void Engine::reclaim() {
  std::lock_guard<std::mutex> lock(swap_mutex_);
  if (retired_.empty()) return;
  std::uint64_t oldest_seen = UINT64_MAX;
  for (auto& s : shards_)
    oldest_seen = std::min(oldest_seen, s->stats().seen_generation.load(std::memory_order_acquire));
  // A snapshot retired at generation G may still be in use by a shard that has not yet
  // published G; once every shard has, none can reach it and its mapping is released.
  retired_.erase(std::remove_if(retired_.begin(), retired_.end(),
                                [&](const auto& r) { return oldest_seen >= r.second; }),
                 retired_.end());
}

}  // namespace adpop
