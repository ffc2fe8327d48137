// A shard's link to the PoP cache (the Redis protocol: Dragonfly in production, redis-server
// here): one non-blocking TCP connection on the shard's own epoll, commands pipelined and
// written once per event batch, replies matched to their commands in order.
//
// What the shards keep there (engine/CACHE.md) is written behind the requests and read back
// at start; only a user's cap counters are read on a request's path, for a bounded wait. A command not
// answered within the timeout marks the link slow: the connection is dropped (its commands fail), and the
// link connects again after a backoff. Meanwhile the shard serves from memory and counts what it could not
// keep.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "net.hpp"

namespace adpop {

struct RespValue {
  enum class Kind : std::uint8_t { kNil, kString, kError, kInteger, kArray };
  Kind kind = Kind::kNil;
  std::string_view text;  // strings and errors: a view into the link's input buffer
  std::int64_t integer = 0;
  std::vector<RespValue> items;
};

// Parses one reply from `in` at `*pos`: true and advances `*pos` when a whole one is there;
// false when more bytes are needed. `*bad` is set on a protocol error.
bool parse_resp(std::string_view in, std::size_t* pos, RespValue* out, bool* bad, int depth = 0);

class CacheLink {
 public:
  using Callback = std::function<void(const RespValue* reply)>;  // nullptr: no answer

  // `password`: sent with AUTH first on every connection ("" for none).
  CacheLink(Endpoint endpoint, std::uint32_t timeout_ms, std::string password);
  ~CacheLink();
  CacheLink(const CacheLink&) = delete;
  CacheLink& operator=(const CacheLink&) = delete;

  int fd() const { return fd_; }
  // Connected, and every command answered within the timeout so far.
  bool up() const { return fd_ >= 0 && connected_; }
  // Connects when down and its backoff has passed; drops a connection whose oldest command
  // is overdue. `epoll_fd` is the shard's: the link adds and removes its own socket.
  void tick(std::int64_t now_ns, int epoll_fd);
  void on_event(std::uint32_t events, std::int64_t now_ns, int epoll_fd);
  // Queues a command; while the link is down its callback gets nullptr at once.
  void send(const std::vector<std::string_view>& args, std::int64_t now_ns, Callback done = {});
  // Writes what is queued (once per event batch).
  void flush(int epoll_fd);

  std::uint64_t failed() const { return failed_; }      // commands that got no answer
  std::uint64_t connects() const { return connects_; }  // successful connections

 private:
  void drop(int epoll_fd);
  void read_replies(int epoll_fd);

  Endpoint endpoint_;
  std::int64_t timeout_ns_;
  std::string password_;
  bool refused_logged_ = false;
  int fd_ = -1;
  bool connected_ = false;
  bool want_write_ = false;
  std::int64_t retry_at_ns_ = 0;
  std::int64_t backoff_ns_ = 0;
  std::string out_;
  std::string in_;
  struct Pending {
    std::int64_t sent_ns;
    Callback done;
  };
  std::deque<Pending> pending_;
  std::uint64_t failed_ = 0;
  std::uint64_t connects_ = 0;
};

}  // namespace adpop
